// Message round trips per second, master <-> one worker, one message in flight:
// the master sends {cmd:"ping", n:i}, the worker sends the same object back, the
// master sends the next one on arrival. Warm-up first, then ~DURATION seconds.
// Also the CPU time (master + worker) per round trip in that window, in microseconds.
// Pair: bench/lua/roundtrip.lua
'use strict';
const cluster = require('cluster');
const fs = require('fs');

const DURATION = Number(process.env.DURATION) || 2;
const WARMUP = 2000;
const hrtime = () => Number(process.hrtime.bigint()) / 1e9;

if (cluster.isWorker) {
  process.on('message', (msg) => process.send(msg));
  return;
}

// CPU seconds (user + system) the given processes have used so far, all their
// threads, from /proc/PID/task/*/schedstat (nanoseconds; the same reading on the
// Lua side). 'self' is the master.
function cpuSeconds(...pids) {
  let total = 0;
  for (const pid of pids) {
    let tasks = [];
    try { tasks = fs.readdirSync(`/proc/${pid}/task`); } catch (e) { continue; }
    for (const tid of tasks) {
      try {
        total += Number(fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
      } catch (e) { /* the thread ended */ }
    }
  }
  return total / 1e9;
}
const worker = cluster.fork();
let n = 0, t0, c0, deadline, count = 0;

const cpuBoth = () => cpuSeconds('self', worker.process.pid);

worker.on('message', (msg) => {
  n++;
  if (n === WARMUP) {
    t0 = hrtime();
    c0 = cpuBoth();
    deadline = t0 + DURATION;
  } else if (n > WARMUP) {
    count++;
    // the clock is read every 256 round trips, the same on both sides
    if (count % 256 === 0) {
      const now = hrtime();
      if (now >= deadline) {
        const result = count / (now - t0);
        const cpuUs = (cpuBoth() - c0) / count * 1e6;
        worker.disconnect();
        console.log(`round trips: ${count} in ${(count / result).toFixed(3)} s, ${cpuUs.toFixed(1)} us CPU each`);
        console.log(`cpu ${cpuUs.toFixed(2)}`);
        console.log(`result ${result.toFixed(0)}`);
        return;
      }
    }
  }
  worker.send({ cmd: 'ping', n });
});
worker.on('online', () => worker.send({ cmd: 'ping', n: 0 }));
