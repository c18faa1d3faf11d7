// The reload benchmark's peer (issue 4): Node's cluster with a hand-written rolling
// restart, written the way a careful Node user would, and the same file is the app that
// PM2 runs in cluster mode (under PM2 this file only ever runs as a worker).
//
// Primary (node node_server.js): forks WORKERS workers (default 2); on SIGHUP, for each
// old worker in turn: fork a new one, wait for its 'listening', then ask the old one to
// shut down gracefully ('shutdown' message, then worker.disconnect()), with a kill
// timer as the fallback (SIGTERM after GRACE ms, SIGKILL 3 s later). A SIGHUP during a
// reload runs another reload after it. A worker that dies unexpectedly is replaced.
// SIGTERM/SIGINT: disconnect every worker, then exit. It prints "ready <pid>" for each
// worker that listens, "reload start" and "reloaded <n>" (bench/reload/run reads them).
//
// Worker: Node's http module answering 200 "hello world" on PORT (127.0.0.1). On
// 'shutdown' (our primary's message before disconnect(), or PM2's `pm2 reload`
// message), or on SIGINT (PM2's kill signal) it closes gracefully: server.close()
// (stop accepting), closeIdleConnections() (idle keep-alive sockets, where available),
// "Connection: close" on every response after that (keep-alive sockets in use end
// after their current request), and exits once the last connection has closed.
// NODE_KEEP_IDLE=1 (not the default; bench/reload/run's BENCH_RELOAD_NODE_KEEP_IDLE=1):
// idle keep-alive sockets are not closed at shutdown (closeIdleConnections is disabled,
// also the call Node >= 19 makes inside server.close()); they end after their next
// request, with "Connection: close", as the luacluster worker does.
'use strict';
const cluster = require('cluster');
const http = require('http');

const PORT = Number(process.env.PORT) || 8000;
const WORKERS = Number(process.env.WORKERS) || 2;
const GRACE = Number(process.env.GRACE) || 5000;

function say(s) { process.stdout.write(s + '\n'); }

if (cluster.isPrimary) {
  let stopping = false;
  let reloading = false;
  let reloadAgain = false;

  cluster.on('listening', (w) => say('ready ' + w.process.pid));
  cluster.on('exit', (w, code, signal) => {
    if (stopping || w.exitedAfterDisconnect) return;
    say(`worker ${w.process.pid} died (${signal || code}); replacing it`);
    cluster.fork();
  });

  const stopGracefully = (w) => {
    let timer = setTimeout(() => {
      w.process.kill('SIGTERM');
      timer = setTimeout(() => w.process.kill('SIGKILL'), 3000);
    }, GRACE);
    w.once('exit', () => clearTimeout(timer));
    w.send('shutdown');
    w.disconnect();
  };

  const waitListening = (w, ms) => new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    w.once('listening', () => { clearTimeout(t); resolve(true); });
    w.once('exit', () => { clearTimeout(t); resolve(false); });
  });

  const reload = async () => {
    reloading = true;
    say('reload start');
    const old = Object.values(cluster.workers).filter((w) => w.isConnected() && !w.isDead());
    let replaced = 0;
    for (const o of old) {
      if (stopping) break;
      if (!o.isConnected() || o.isDead()) continue;
      const n = cluster.fork();
      if (!(await waitListening(n, 10000))) {
        say('reload failed: a new worker did not listen');
        n.process.kill('SIGKILL');
        break;
      }
      stopGracefully(o);
      replaced += 1;
    }
    say('reloaded ' + replaced);
    reloading = false;
    if (reloadAgain && !stopping) { reloadAgain = false; reload(); }
  };

  process.on('SIGHUP', () => {
    if (reloading) reloadAgain = true; else reload();
  });
  const shutdown = () => {
    if (stopping) return;
    stopping = true;
    for (const w of Object.values(cluster.workers)) stopGracefully(w);
    cluster.disconnect(() => process.exit(0));
    setTimeout(() => process.exit(0), GRACE + 4000).unref();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);

  for (let i = 0; i < WORKERS; i++) cluster.fork();
} else {
  let closing = false;
  const server = http.createServer((req, res) => {
    if (closing) res.setHeader('Connection', 'close');
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': 12 });
    res.end('hello world\n');
  });
  const closeGracefully = () => {
    if (closing) return;
    closing = true;
    if (process.env.NODE_KEEP_IDLE === '1') server.closeIdleConnections = () => {};
    server.close(() => process.exit(0));
    if (typeof server.closeIdleConnections === 'function') server.closeIdleConnections();
  };
  process.on('message', (msg) => { if (msg === 'shutdown') closeGracefully(); });
  process.on('SIGINT', closeGracefully);
  server.listen(PORT, '127.0.0.1');
}
