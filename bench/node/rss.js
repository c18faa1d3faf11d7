// Idle worker RSS: fork WORKERS workers that stay idle; once each is online (and
// SETTLE ms more), read VmRSS from /proc/PID/status. Prints the median in KB.
// Pair: bench/lua/rss.lua
'use strict';
const cluster = require('cluster');
const fs = require('fs');

const WORKERS = Number(process.env.WORKERS) || 4;
const SETTLE = Number(process.env.SETTLE) || 500;

if (cluster.isWorker) {
  process.on('message', () => {}); // idle until disconnected
  return;
}

function vmrssKb(pid) {
  try {
    const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    return Number(/VmRSS:\s*(\d+)/.exec(s)[1]);
  } catch (e) {
    return null;
  }
}

const rss = [];
let online = 0;
cluster.on('online', () => {
  online++;
  if (online < WORKERS) return;
  setTimeout(() => {
    for (const id in cluster.workers) rss.push(vmrssKb(cluster.workers[id].process.pid));
    cluster.disconnect(() => {
      rss.sort((a, b) => a - b);
      console.log(`worker VmRSS (KB): ${rss.join(' ')}; master: ${vmrssKb('self')}`);
      console.log(`result ${rss[(rss.length - 1) >> 1]}`);
    });
  }, SETTLE);
});
for (let i = 0; i < WORKERS; i++) cluster.fork();
