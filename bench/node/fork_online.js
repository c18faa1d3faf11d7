// 16 workers from fork to 'online', wall time on the master, repeated REPEAT times;
// prints the median. Also the CPU time it took (master's share plus all the workers'
// CPU up to the moment the last one is online). Workers stay idle until disconnected.
// Pair: bench/lua/fork_online.lua
'use strict';
const cluster = require('cluster');
const fs = require('fs');

const WORKERS = Number(process.env.WORKERS) || 16;
const REPEAT = Number(process.env.REPEAT) || 5;

if (cluster.isWorker) {
  process.on('message', () => {}); // idle until disconnected
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
const hrtime = () => Number(process.hrtime.bigint()) / 1e9;
const times = [], cpus = [];

function round() {
  let online = 0;
  const c0 = cpuSeconds('self'); // read before the clock starts, as on the Lua side
  const t0 = hrtime();
  function onOnline() {
    online++;
    if (online < WORKERS) return;
    times.push((hrtime() - t0) * 1000);
    const pids = Object.values(cluster.workers).map((w) => w.process.pid);
    const cpu = cpuSeconds('self', ...pids) - c0;
    cpus.push(cpu * 1000);
    cluster.off('online', onOnline);
    cluster.disconnect(() => {
      if (times.length < REPEAT) round(); else done();
    });
  }
  cluster.on('online', onOnline);
  for (let i = 0; i < WORKERS; i++) cluster.fork();
}

function median(t) {
  t.sort((a, b) => a - b);
  return t[(t.length - 1) >> 1];
}

function done() {
  console.log('runs (ms): ' + times.map((t) => t.toFixed(1)).join(' '));
  console.log('cpu ' + median(cpus).toFixed(1));
  console.log('result ' + median(times).toFixed(2));
}

round();
