-- Sticky sessions, built in Lua on worker:send(message, socket): the master accepts on
-- PORT itself, paused (it reads nothing), and hands every connection from one client
-- address to the same worker, which can then keep state per client. Here each worker
-- counts its clients' visits: a client keeps seeing one worker and its count goes up.
--
-- Run:  lua5.4 examples/sticky.lua              (PORT=8080 WORKERS=4 lua5.4 examples/sticky.lua)
-- Then: curl http://127.0.0.1:8000/             (again and again: one worker, visit 1, 2, 3...)
--       curl --interface 127.0.0.2 http://127.0.0.1:8000/    (another address, maybe another worker)
-- Stop: Ctrl-C or kill -TERM <master pid>: the master stops accepting, disconnects the
--       workers (each finishes its open requests) and exits 0; workers still busy after
--       3 s (an idle keep-alive client) are killed.
--
-- A worker that dies is replaced in its slot, so its clients go to the new one (their
-- counts start again: the state was the dead worker's). Connections on their way to a
-- worker when it dies are lost with it: stickiness means no other worker may take them.
local cluster = require "cluster"
local net = require "cluster.net"

local PORT = math.tointeger(tonumber(os.getenv("PORT"))) or 8000
local WORKERS = math.tointeger(tonumber(os.getenv("WORKERS"))) or cluster.cpus()

if cluster.isMaster then
  io.stdout:setvbuf("line")

  -- slots[i] is the worker that serves the clients whose address hashes to i
  local slots = {}
  local function fork(slot)
    local worker = cluster.fork()
    worker.slot = slot
    slots[slot] = worker
  end

  -- FNV-1a over the address's bytes: one address, one slot, in every run
  local function slot_for(address)
    local h = 2166136261
    for i = 1, #address do h = ((h ~ address:byte(i)) * 16777619) & 0xffffffff end
    return h % WORKERS + 1
  end

  local stopping = false
  cluster.on("exit", function(worker, code, signal)
    if stopping then return end
    print(("worker %d died (%s); a new worker takes its clients"):format(worker.id, signal or code))
    fork(worker.slot)
  end)

  local server = net.createServer({ pauseOnConnect = true }, function(socket)
    local worker = slots[slot_for(socket.remoteAddress or "")]
    if not worker:isConnected() then return socket:destroy() end
    -- the socket is the worker's from here on; if it cannot get there, nobody serves it
    worker:send("sticky:connection", socket, function(err)
      if err then socket:destroy() end
    end)
  end)
  server:on("error", function(err)
    io.stderr:write(("master: %s\n"):format(tostring(err)))
    stopping = true
    cluster.disconnect()
  end)

  for slot = 1, WORKERS do fork(slot) end
  cluster.on("online", function(worker) print(("worker %d online (slot %d)"):format(worker.id, worker.slot)) end)
  server:listen(PORT, "127.0.0.1", function() print(("sticky sessions on 127.0.0.1:%d"):format(PORT)) end)

  local function stop(signal)
    if stopping then return end
    stopping = true
    print(("%s: stopping"):format(signal))
    server:close()
    local force = cluster.setTimeout(function()
      for _, worker in pairs(cluster.workers) do worker:kill("SIGKILL") end
    end, 3000)
    cluster.disconnect(function() cluster.clearTimeout(force) end)
  end
  cluster.on("SIGTERM", stop)
  cluster.on("SIGINT", stop)
else
  local visits = {} -- client address -> visits: this worker's own state

  local RESPONSE = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"

  -- A few honest lines of HTTP: one answer per request head, keep-alive unless asked.
  local function serve(socket)
    local address = socket.remoteAddress or "?"
    local buffer = ""
    socket:on("data", function(chunk)
      buffer = buffer .. chunk
      while true do
        local head_end = buffer:find("\r\n\r\n", 1, true)
        if not head_end then break end
        local head = buffer:sub(1, head_end)
        buffer = buffer:sub(head_end + 4)
        visits[address] = (visits[address] or 0) + 1
        local body = ("worker %d (pid %d): visit %d from %s\n"):format(cluster.worker.id,
          cluster.worker.process.pid, visits[address], address)
        if head:lower():find("\nconnection: *close") then
          socket:close(RESPONSE:format(#body, "Connection: close\r\n", body))
          return
        end
        socket:write(RESPONSE:format(#body, "", body))
      end
    end)
    socket:on("error", function() end)
  end

  cluster.worker:on("message", function(message, socket)
    if message == "sticky:connection" and socket then
      serve(socket)
      socket:resume()
    end
  end)
  -- Ctrl-C at a terminal reaches the master only; the master does the stopping
  cluster.on("SIGINT", function() end)
end

cluster.run()
