-- The reload benchmark's contender from this project (issue 4): a supervised master
-- (cluster.supervise, as examples/supervisor.lua, minimal) with WORKERS workers
-- (default 2) that share PORT on 127.0.0.1 through cluster.net and answer every request
-- with a fixed 200 "hello world". SIGHUP to the master is the supervisor's default: a
-- rolling reload (new worker before old, gated on 'listening'; the old one leaves
-- distribution at once and drains).
-- A worker whose server is closing (it is being replaced) answers the request in hand
-- with "Connection: close" and closes the connection, so keep-alive clients move to the
-- new workers without losing a request.
-- The master prints "ready <pid>" for each worker that is ready, "reload start",
-- "reloaded <n>" and "reload failed: ..." (bench/reload/run reads them).
local cluster = require "cluster"
local net = require "cluster.net"

local PORT = tonumber(os.getenv("PORT")) or 8000
local WORKERS = tonumber(os.getenv("WORKERS")) or 2

local RESPONSE = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
local KEEP_ALIVE = RESPONSE .. "\r\nhello world\n"
local CLOSE = RESPONSE .. "Connection: close\r\n\r\nhello world\n"

if cluster.isMaster then
  local function say(s) io.stdout:write(s, "\n") io.stdout:flush() end
  cluster.supervise {
    workers = WORKERS,
    readiness = "listening",
    grace = 5000, killTimeout = 3000,
  }
  cluster.on("ready", function(w) say("ready " .. w.process.pid) end)
  cluster.on("reload", function(phase) if phase == "start" then say("reload start") end end)
  cluster.on("reloaded", function(info) say("reloaded " .. info.replaced) end)
  cluster.on("reloadFailed", function(info) say("reload failed: " .. info.reason) end)
else
  local server
  server = net.createServer(function(socket)
    local buffer = ""
    socket:on("data", function(chunk)
      if buffer ~= "" then chunk = buffer .. chunk end
      local pos = 1
      while true do
        local head_end = chunk:find("\r\n\r\n", pos, true)
        if not head_end then break end
        local head = chunk:sub(pos, head_end)
        pos = head_end + 4
        -- closing (disconnect): finish this keep-alive connection politely
        if not server.listening or head:lower():find("\nconnection: *close") then
          socket:close(CLOSE)
          return
        end
        socket:write(KEEP_ALIVE)
      end
      buffer = chunk:sub(pos)
    end)
    socket:on("error", function() end)
  end)
  server:listen(PORT, "127.0.0.1")
end

cluster.run()
