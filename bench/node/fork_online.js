// 16 workers from fork to 'online', wall time on the master, repeated; prints the median.
// Workers stay idle until disconnected. Pair: bench/lua/fork_online.lua
'use strict';
const cluster = require('cluster');

const WORKERS = Number(process.env.WORKERS) || 16;
const REPEAT = Number(process.env.REPEAT) || 5;

if (cluster.isWorker) {
  process.on('message', () => {}); // idle until disconnected
  return;
}

const times = [];
const hrtime = () => Number(process.hrtime.bigint()) / 1e9;

function round() {
  let online = 0;
  const t0 = hrtime();
  function onOnline() {
    online++;
    if (online < WORKERS) return;
    times.push((hrtime() - t0) * 1000);
    cluster.off('online', onOnline);
    cluster.disconnect(() => {
      if (times.length < REPEAT) round(); else done();
    });
  }
  cluster.on('online', onOnline);
  for (let i = 0; i < WORKERS; i++) cluster.fork();
}

function done() {
  times.sort((a, b) => a - b);
  console.log('runs (ms, sorted): ' + times.map((t) => t.toFixed(1)).join(' '));
  console.log('result ' + times[(times.length - 1) >> 1].toFixed(2));
}

round();
