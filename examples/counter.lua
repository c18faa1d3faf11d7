-- The seed's request counter (Node's cluster docs): one worker per CPU serves HTTP on a
-- shared port and tells the master about every request with {cmd = "notifyRequest"};
-- the master prints the running total every second.
--
-- Run:  lua5.4 examples/counter.lua          (PORT=8080 lua5.4 examples/counter.lua)
-- Then: curl http://127.0.0.1:8000/
-- Stop: Ctrl-C or kill -TERM <master pid>: the master disconnects the workers (each
--       finishes its open requests), then the loop ends and it exits 0. Workers still
--       busy after 3 s (an idle keep-alive client) are killed.
local cluster = require "cluster"
local net = require "cluster.net"

local PORT = math.tointeger(tonumber(os.getenv("PORT"))) or 8000

if cluster.isMaster then
  io.stdout:setvbuf("line")

  -- Keep track of HTTP requests
  local numReqs = 0
  local ticker = cluster.setInterval(function()
    print(("numReqs = %d"):format(numReqs))
  end, 1000)

  -- Count requests
  local function messageHandler(msg)
    if type(msg) == "table" and msg.cmd == "notifyRequest" then
      numReqs = numReqs + 1
    end
  end

  -- Start workers and listen for messages containing notifyRequest
  local workers = {}
  for i = 1, cluster.cpus() do workers[i] = cluster.fork() end
  for _, worker in pairs(cluster.workers) do
    worker:on("message", messageHandler)
  end

  cluster.on("exit", function(worker, code, signal)
    if signal ~= nil or code ~= 0 then
      print(("worker %d died (%s)"):format(worker.process.pid, signal or code))
    end
    if next(cluster.workers) == nil then
      -- nobody serves any more (the port was taken, say): let the loop end
      cluster.clearInterval(ticker)
    end
  end)

  local stopping = false
  local function stop(signal)
    if stopping then return end
    stopping = true
    print(("%s: stopping; numReqs = %d"):format(signal, numReqs))
    cluster.clearInterval(ticker)
    local force = cluster.setTimeout(function()
      for _, worker in ipairs(workers) do
        if not worker:isDead() then worker:kill("SIGKILL") end
      end
    end, 3000)
    -- with the workers gone and the timers cleared, cluster.run() returns
    cluster.disconnect(function() cluster.clearTimeout(force) end)
  end
  cluster.on("SIGTERM", stop)
  cluster.on("SIGINT", stop)
else
  -- Workers share the port: each answers "hello world" and notifies the master.
  local RESPONSE = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
  local server = net.createServer(function(socket)
    local buffer = ""
    socket:on("data", function(chunk)
      buffer = buffer .. chunk
      while true do
        local head_end = buffer:find("\r\n\r\n", 1, true)
        if not head_end then break end
        local head = buffer:sub(1, head_end)
        buffer = buffer:sub(head_end + 4)
        -- Notify master about the request
        cluster.worker:send({ cmd = "notifyRequest" })
        if head:lower():find("\nconnection: *close") then
          socket:close(RESPONSE .. "Connection: close\r\n\r\nhello world\n")
          return
        end
        socket:write(RESPONSE .. "\r\nhello world\n")
      end
    end)
    socket:on("error", function() end)
  end)
  server:on("error", function(err)
    io.stderr:write(("worker %d: %s\n"):format(cluster.worker.id, tostring(err)))
    cluster.worker:disconnect()
  end)
  server:listen(PORT)
  -- Ctrl-C at a terminal reaches the master only (workers run in process groups of their
  -- own); a SIGINT sent to a worker itself is ignored too: the master does the stopping
  cluster.on("SIGINT", function() end)
end

cluster.run()
