// One-way messages per second, worker -> master: the worker sends N small objects
// {cmd:"notifyRequest", n:i} in a loop as fast as it can; the master counts them on
// arrival. Timed on the master from sending "go" to the arrival of the Nth message.
// (process.send is asynchronous: what counts is arrival in the master, not the loop.)
// Pair: bench/lua/oneway.lua
'use strict';
const cluster = require('cluster');

const N = Number(process.env.N) || 1000000;
const hrtime = () => Number(process.hrtime.bigint()) / 1e9;

if (cluster.isWorker) {
  process.on('message', (msg) => {
    if (msg !== 'go') return;
    for (let i = 1; i <= N; i++) process.send({ cmd: 'notifyRequest', n: i });
  });
  return;
}

const worker = cluster.fork();
let count = 0, t0;

worker.on('message', (msg) => {
  if (msg.cmd === 'notifyRequest') {
    count++;
    if (count === N) {
      const elapsed = hrtime() - t0;
      worker.disconnect();
      console.log(`messages: ${count} in ${elapsed.toFixed(3)} s`);
      console.log(`result ${(N / elapsed).toFixed(0)}`);
    }
  }
});
worker.on('online', () => {
  t0 = hrtime();
  worker.send('go');
});
