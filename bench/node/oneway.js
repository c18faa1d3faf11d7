// One-way messages per second, worker -> master: the worker sends N small objects
// {cmd:"notifyRequest", n:i} in a loop as fast as it can; the master counts them on
// arrival. Timed on the master from sending "go" to the arrival of the Nth message.
// (process.send is asynchronous: what counts is arrival in the master, not the loop.)
// Also the CPU time (master + worker) per message in that window, in microseconds.
// Pair: bench/lua/oneway.lua
'use strict';
const cluster = require('cluster');
const fs = require('fs');

const N = Number(process.env.N) || 1000000;
const hrtime = () => Number(process.hrtime.bigint()) / 1e9;

if (cluster.isWorker) {
  process.on('message', (msg) => {
    if (msg !== 'go') return;
    for (let i = 1; i <= N; i++) process.send({ cmd: 'notifyRequest', n: i });
  });
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
let count = 0, t0, c0;

const cpuBoth = () => cpuSeconds('self', worker.process.pid);

worker.on('message', (msg) => {
  if (msg.cmd === 'notifyRequest') {
    count++;
    if (count === N) {
      const elapsed = hrtime() - t0;
      const cpuUs = (cpuBoth() - c0) / N * 1e6;
      worker.disconnect();
      console.log(`messages: ${count} in ${elapsed.toFixed(3)} s, ${cpuUs.toFixed(2)} us CPU each`);
      console.log(`cpu ${cpuUs.toFixed(3)}`);
      console.log(`result ${(N / elapsed).toFixed(0)}`);
    }
  }
});
worker.on('online', () => {
  t0 = hrtime();
  c0 = cpuBoth();
  worker.send('go');
});
