-- The HTTP benchmark's contender from this project: a master forks WORKERS workers
-- (default 2) that share PORT through cluster.net and answer every request with a
-- fixed 200 "hello world" (keep-alive unless the request says "Connection: close").
-- The scheduling policy comes from CLUSTER_SCHED_POLICY (rr | none).
-- bench/http/node_server.js is the same responder written the same way for Node.
-- The master prints "ready" once every worker listens.
local cluster = require "cluster"
local net = require "cluster.net"

local PORT = tonumber(os.getenv("PORT")) or 8000
local WORKERS = tonumber(os.getenv("WORKERS")) or 2

local RESPONSE = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
local KEEP_ALIVE = RESPONSE .. "\r\nhello world\n"
local CLOSE = RESPONSE .. "Connection: close\r\n\r\nhello world\n"

if cluster.isMaster then
  local listening = 0
  cluster.on("listening", function()
    listening = listening + 1
    if listening == WORKERS then
      io.stdout:write("ready\n")
      io.stdout:flush()
    end
  end)
  for _ = 1, WORKERS do cluster.fork() end
else
  net.createServer(function(socket)
    local buffer = ""
    socket:on("data", function(chunk)
      if buffer ~= "" then chunk = buffer .. chunk end
      local pos = 1
      while true do
        local head_end = chunk:find("\r\n\r\n", pos, true)
        if not head_end then break end
        local head = chunk:sub(pos, head_end)
        pos = head_end + 4
        -- the header by a plain search, its value anchored there: a pattern that may
        -- start anywhere is tried at every position (Lua's patterns are not compiled)
        local lower = head:lower()
        local at = lower:find("\nconnection:", 1, true)
        if at and lower:find("^[ \t]*close", at + 12) then
          -- as Node's http server does for Connection: close: close once written,
          -- without waiting for the client's FIN
          socket:write(CLOSE)
          socket:destroySoon()
          return
        end
        socket:write(KEEP_ALIVE)
      end
      buffer = chunk:sub(pos)
    end)
    socket:on("error", function() end)
  end):listen(PORT, "127.0.0.1")
end

cluster.run()
