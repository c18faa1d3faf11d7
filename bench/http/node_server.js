// The HTTP benchmark's peer: Node's cluster with its net module, the same responder
// as bench/http/lua_server.lua written the same way. A master forks WORKERS workers
// (default 2) that share PORT and answer every request with a fixed 200 "hello world"
// (keep-alive unless the request says "Connection: close"). The scheduling policy
// comes from NODE_CLUSTER_SCHED_POLICY (rr | none). The master prints "ready" once
// every worker listens.
'use strict';
const cluster = require('cluster');
const net = require('net');

const PORT = Number(process.env.PORT) || 8000;
const WORKERS = Number(process.env.WORKERS) || 2;

const RESPONSE = 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n';
const KEEP_ALIVE = RESPONSE + '\r\nhello world\n';
const CLOSE = RESPONSE + 'Connection: close\r\n\r\nhello world\n';
const CLOSE_VALUE = /[ \t]*close/y; // sticky: matches at lastIndex only

if (cluster.isPrimary) {
  let listening = 0;
  cluster.on('listening', () => {
    listening += 1;
    if (listening === WORKERS) process.stdout.write('ready\n');
  });
  for (let i = 0; i < WORKERS; i++) cluster.fork();
} else {
  net.createServer((socket) => {
    let buffer = '';
    socket.on('data', (data) => {
      let chunk = data.toString('latin1');
      if (buffer !== '') chunk = buffer + chunk;
      let pos = 0;
      for (;;) {
        const headEnd = chunk.indexOf('\r\n\r\n', pos);
        if (headEnd < 0) break;
        const head = chunk.slice(pos, headEnd + 1);
        pos = headEnd + 4;
        // the header by a plain search, its value anchored there (as the Lua responder)
        const lower = head.toLowerCase();
        const at = lower.indexOf('\nconnection:');
        CLOSE_VALUE.lastIndex = at + 12;
        if (at >= 0 && CLOSE_VALUE.test(lower)) {
          // as Node's http server does for Connection: close: close once written,
          // without waiting for the client's FIN
          socket.write(CLOSE);
          socket.destroySoon();
          return;
        }
        socket.write(KEEP_ALIVE);
      }
      buffer = chunk.slice(pos);
    });
    socket.on('error', () => {});
  }).listen(PORT, '127.0.0.1');
}
