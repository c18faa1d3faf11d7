// Message round trips per second, master <-> one worker, one message in flight:
// the master sends {cmd:"ping", n:i}, the worker sends the same object back, the
// master sends the next one on arrival. Warm-up first, then ~DURATION seconds.
// Pair: bench/lua/roundtrip.lua
'use strict';
const cluster = require('cluster');

const DURATION = Number(process.env.DURATION) || 2;
const WARMUP = 2000;
const hrtime = () => Number(process.hrtime.bigint()) / 1e9;

if (cluster.isWorker) {
  process.on('message', (msg) => process.send(msg));
  return;
}

const worker = cluster.fork();
let n = 0, t0, deadline, count = 0, result;

worker.on('message', (msg) => {
  n++;
  if (n === WARMUP) {
    t0 = hrtime();
    deadline = t0 + DURATION;
  } else if (n > WARMUP) {
    count++;
    if (count % 256 === 0) {
      const now = hrtime();
      if (now >= deadline) {
        result = count / (now - t0);
        worker.disconnect();
        console.log(`round trips: ${count} in ${(count / result).toFixed(3)} s`);
        console.log(`result ${result.toFixed(0)}`);
        return;
      }
    }
  }
  worker.send({ cmd: 'ping', n });
});
worker.on('online', () => worker.send({ cmd: 'ping', n: 0 }));
