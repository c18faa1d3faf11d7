--- Statistics: worker:stats() and cluster.stats(). Cheap enough to call every second:
-- one read of /proc/PID/stat per process, the rest is already in memory.
-- @module cluster.stats
local core = require "cluster.core"
local Worker = require "cluster.worker"

local M = {}

function M.install(cluster)
  local started = core.hrtime()

  --- {id, pid, state, uptime (s), restarts, connections (RR handed), rss (bytes),
  -- cpu (user+system s), ready (bool; false once dead)}
  function Worker:stats()
    local pid = self.process and self.process.pid
    local dead = self:isDead()
    local st = pid and not dead and core.proc_stats(pid) or nil
    local forked = rawget(self, "_forkedHr")
    return {
      id = self.id,
      pid = pid,
      state = self.state,
      uptime = forked and ((rawget(self, "_exitedHr") or core.hrtime()) - forked) or 0,
      restarts = rawget(self, "_restarts") or 0,
      connections = cluster._handedTo and cluster._handedTo(self) or 0,
      rss = st and st.rss or 0,
      cpu = st and (st.utime + st.stime) or 0,
      ready = rawget(self, "_ready") == true and not dead,
    }
  end

  --- {master = {pid, rss, cpu, uptime}, workers = {worker:stats(), ...} sorted by id,
  -- count, restarts (sum)}
  function cluster.stats()
    local me = core.proc_stats() or { rss = 0, utime = 0, stime = 0 }
    local list, restarts = {}, 0
    for _, w in pairs(cluster.workers) do
      local s = w:stats()
      list[#list + 1] = s
      restarts = restarts + s.restarts
    end
    table.sort(list, function(a, b) return a.id < b.id end)
    return {
      master = { pid = core.getpid(), rss = me.rss, cpu = me.utime + me.stime, uptime = core.hrtime() - started },
      workers = list,
      count = #list,
      restarts = restarts,
    }
  end
end

return M
