-- Reproducer: under SCHED_RR, a unix-socket connection that a worker has already served
-- is handed to another worker when the first dies before its 'accepted' answer reached
-- the master (answers are batched, up to 1 ms). The client got its whole answer, but the
-- connection is never closed: the second worker holds it, waiting for a request.
local cluster = require "cluster"
local net = require "cluster.net"
local core = require "cluster.core"
--   lua5.4 bench/soak/repro_unix_handoff.lua [unix|tcp]
-- unix: the client has its whole answer after 3 s and the connection is still open
-- (worker 2 holds it); tcp, for contrast: the master sees the connection was served
-- (TCP_INFO) and closes it, so the client's connection ends at once.
local MODE = os.getenv("REPRO_MODE") or arg[1] or "unix"
local PATH = (os.getenv("TMPDIR") or "/tmp") .. "/repro-unix-handoff.sock"
local PORT = 18990
local function where() if MODE == "tcp" then return PORT, "127.0.0.1" end return PATH end

if cluster.isWorker then
  local first = os.getenv("FIRST") == "1"
  net.createServer(function(s)
    s:on("data", function()
      s:write("answer")
      s:destroySoon()
      -- die at once, before the batched answer is written (SIGKILL: no exit flush)
      if first then os.execute("kill -KILL " .. cluster.worker.process.pid) end
    end)
  end):listen(where())
  cluster.run()
  return
end

cluster.schedulingPolicy = cluster.SCHED_RR
os.remove(PATH)
-- worker 1 joins the round-robin first, so it gets the first connection
cluster.fork { FIRST = "1", REPRO_MODE = MODE }
local listening = 0
cluster.on("listening", function()
  listening = listening + 1
  if listening == 1 then cluster.fork { FIRST = "0", REPRO_MODE = MODE } return end
  local got, t0 = "", core.hrtime()
  local c = net.connect(where())
  c:on("connect", function() c:write("request") end)
  c:on("data", function(d) got = got .. d end)
  c:on("close", function()
    print(string.format(MODE .. " client: closed after %.2f s, got %q", core.hrtime() - t0, got))
  end)
  cluster.setTimeout(function()
    print(string.format(MODE .. " client: after 3 s: got %q, still open: %s", got, tostring(not c.destroyed)))
    c:destroy()
    for _, w in pairs(cluster.workers) do w:kill() end
  end, 3000)
end)
cluster.run()
