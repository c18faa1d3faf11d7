-- A realistic supervision script around the seed's HTTP server.
--   lua5.4 examples/supervisor.lua        then, from another terminal:
--   kill -HUP  <master pid>   rolling reload, new workers before old, no dropped request
--   kill -TTIN <master pid>   one more worker;  kill -TTOU: one fewer
--   kill -TERM <master pid>   graceful shutdown (disconnect, SIGTERM, SIGKILL), exit 0
local cluster = require "cluster"
local net = require "cluster.net"

local PORT = tonumber(os.getenv("PORT")) or 8000

if cluster.isMaster then
  cluster.setupMaster { silent = true }   -- worker output comes back line by line, prefixed

  cluster.supervise {
    workers = tonumber(os.getenv("WORKERS")) or cluster.cpus(),
    -- restart a worker that crashed; one that exits 0 on purpose stays down
    restart = function(worker, code, signal)
      if code == 0 and not signal then return false end
      return true -- after the backoff delay
    end,
    backoff = { initial = 200, factor = 2, max = 10000, reset = 5000 },
    intensity = 5, period = 10,
    onCrashLoop = function(info)
      print(("crash loop: %d restarts in %d s; pausing 30 s"):format(info.restarts, info.period))
      return "retry", 30000
    end,
    readiness = "listening", readyTimeout = 10000,
    grace = 5000, killTimeout = 3000,
    watchdog = { interval = 500, timeout = 3000 },
    recycle = { maxConnections = 100000, maxRss = 200 * 1024 * 1024, maxAge = 3600 * 1000 },
  }

  cluster.on("ready", function(w) print(("worker %d (pid %d) ready"):format(w.id, w.process.pid)) end)
  cluster.on("respawn", function(w, old, delay)
    print(("worker %d replaces %d after %d ms"):format(w.id, old.id, delay))
  end)
  cluster.on("reloaded", function(info) print(("reload done: %d workers replaced"):format(info.replaced)) end)
  cluster.on("reloadFailed", function(info) print("reload stopped: " .. info.reason) end)
  cluster.on("watchdog", function(w, ms) print(("worker %d silent for %d ms: replacing"):format(w.id, ms)) end)
  cluster.on("recycle", function(w, why) print(("recycling worker %d (%s)"):format(w.id, why)) end)

  -- a line of stats every 10 s
  cluster.setInterval(function()
    local s = cluster.stats()
    local parts = {}
    for _, w in ipairs(s.workers) do
      parts[#parts + 1] = ("#%d %s %dKB %d conns"):format(w.id, w.state, w.rss // 1024, w.connections)
    end
    print(("master rss %dKB | %s"):format(s.master.rss // 1024, table.concat(parts, ", ")))
  end, 10000):unref()
else
  local RESPONSE = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
  local server
  server = net.createServer(function(socket)
    local buffer = ""
    socket:on("data", function(chunk)
      buffer = buffer .. chunk
      while true do
        local head_end = buffer:find("\r\n\r\n", 1, true)
        if not head_end then break end
        local head = buffer:sub(1, head_end)
        buffer = buffer:sub(head_end + 4)
        -- once the server closes (disconnect), finish keep-alive connections politely
        if not server.listening or head:lower():find("\nconnection: *close") then
          socket:close(RESPONSE .. "Connection: close\r\n\r\nhello world\n")
          return
        end
        socket:write(RESPONSE .. "\r\nhello world\n")
      end
    end)
    socket:on("error", function() end)
  end)
  server:listen(PORT)
  print("serving on port " .. PORT)
end

cluster.run()
