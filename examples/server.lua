-- The seed's first example: a master forks one worker per CPU; the workers share
-- port 8000 and answer every HTTP request with "hello world".
-- Run: make run   (or lua5.4 examples/server.lua), then: curl http://127.0.0.1:8000/
local cluster = require "cluster"
local net = require "cluster.net"

local PORT = tonumber(os.getenv("PORT")) or 8000

if cluster.isMaster then
  for _ = 1, cluster.cpus() do cluster.fork() end

  cluster.on("online", function(worker)
    print(("Worker %d online"):format(worker.process.pid))
  end)
  cluster.on("exit", function(worker, code, signal)
    print(("worker %d died (%s)"):format(worker.process.pid, signal or code))
  end)
else
  -- Workers can share any TCP connection; in this case it is an HTTP server.
  -- A few honest lines of HTTP/1.1: answer each request (keep-alive unless the client
  -- says "Connection: close").
  local RESPONSE = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
  net.createServer(function(socket)
    local buffer = ""
    socket:on("data", function(chunk)
      buffer = buffer .. chunk
      while true do
        local head_end = buffer:find("\r\n\r\n", 1, true)
        if not head_end then break end
        local head = buffer:sub(1, head_end)
        buffer = buffer:sub(head_end + 4)
        if head:lower():find("\nconnection: *close") then
          socket:close(RESPONSE .. "Connection: close\r\n\r\nhello world\n")
          return
        end
        socket:write(RESPONSE .. "\r\nhello world\n")
      end
    end)
    socket:on("error", function() end)
  end):listen(PORT)
end

cluster.run()
