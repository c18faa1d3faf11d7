-- The soak's load process: a plain cluster.net / cluster.dgram client (a master with no
-- workers) that keeps SOAK_CLIENTS connections going at once against the shared ports:
-- the supervised TCP port, the churn TCP port and the two unix paths, one HTTP request
-- with "Connection: close" each, plus a UDP datagram to the shared UDP port every
-- SOAK_UDP_MS (answered by whichever worker reads it).
--
-- Signals (from bench/soak/run):
--   SIGUSR2  append a line of counters (and this process's Lua heap) to SOAK_LOAD_STATS
--   SIGUSR1  toggle pause: no new connections; once none is open, a line "paused"
local cluster = require "cluster"
local net = require "cluster.net"
local dgram = require "cluster.dgram"
local core = require "cluster.core"

local settings = dofile((arg[0]:match("^(.*)/") or ".") .. "/settings.lua")
local env_num = settings.env_num
local HOST, PORT_SUP, PORT_CHURN, PORT_UDP = settings.HOST, settings.PORT_SUP, settings.PORT_CHURN, settings.PORT_UDP
local UNIX_SUP, UNIX_CHURN = settings.UNIX_SUP, settings.UNIX_CHURN
local CLIENTS = env_num("SOAK_CLIENTS", 6)
local UDP_MS = env_num("SOAK_UDP_MS", 5)
local TIMEOUT_MS = env_num("SOAK_CLIENT_TIMEOUT_MS", 5000)
local DEBUG = os.getenv("SOAK_DEBUG")
local STATS = assert(os.getenv("SOAK_LOAD_STATS"), "SOAK_LOAD_STATS is not set (run bench/soak/run)")

local statsfile = assert(io.open(STATS, "a"))
statsfile:setvbuf("line")

local TARGETS = {
  { name = "sup", port = PORT_SUP },
  { name = "churn", port = PORT_CHURN },
  { name = "unix_sup", path = UNIX_SUP },
  { name = "unix_churn", path = UNIX_CHURN },
  { name = "sup2", port = PORT_SUP },   -- the supervised port twice as often
}
local REQUEST = "GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"

local C = { conns = 0, ok = 0, failed = 0, udpSent = 0, udpAnswered = 0 }
local errs = {}          -- code -> count
local per = {}           -- target -> ok count
local open = 0
local open_by = {}       -- target -> connections open
local timeouts = {}      -- target -> connections given up (no answer in TIMEOUT_MS)
local paused = false
local started = core.hrtime()
local turn = 0

local function start_one()
  if paused then return end
  turn = turn + 1
  local target = TARGETS[turn % #TARGETS + 1]
  open = open + 1
  open_by[target.name] = (open_by[target.name] or 0) + 1
  local got = {}
  local ended = false
  local c = target.path and net.connect({ path = target.path }) or net.connect(target.port, HOST)
  c:on("connect", function() c:write(REQUEST) end)
  -- a connection with no answer for TIMEOUT_MS is given up (counted by target)
  c:setTimeout(TIMEOUT_MS, function()
    timeouts[target.name] = (timeouts[target.name] or 0) + 1
    if DEBUG then
      io.stderr:write(string.format("load: %s timed out at %.3f: bytesWritten=%s bytesRead=%s connecting=%s\n",
        target.name, core.hrtime() - started, tostring(c.bytesWritten), tostring(c.bytesRead), tostring(c.connecting)))
    end
    c:destroy()
  end)
  c:on("data", function(chunk) got[#got + 1] = chunk end)
  c:on("error", function(err)
    local code = type(err) == "table" and err.code or tostring(err)
    errs[code] = (errs[code] or 0) + 1
  end)
  c:on("close", function()
    if ended then return end
    ended = true
    open = open - 1
    open_by[target.name] = open_by[target.name] - 1
    C.conns = C.conns + 1
    local body = table.concat(got)
    if body:find("200 OK", 1, true) then
      C.ok = C.ok + 1
      per[target.name] = (per[target.name] or 0) + 1
    else
      C.failed = C.failed + 1
    end
    if paused then
      if open == 0 then statsfile:write(string.format("paused t=%.1f\n", core.hrtime() - started)) end
    else
      -- a refused connection (no churn worker listening just now) waits a little
      if #got == 0 then cluster.setTimeout(start_one, 5) else cluster.defer(start_one) end
    end
  end)
end

for _ = 1, CLIENTS do start_one() end

local udp = dgram.createSocket("udp4", function() C.udpAnswered = C.udpAnswered + 1 end)
udp:on("error", function() end)
udp:bind(0, HOST)
cluster.setInterval(function()
  if paused then return end
  C.udpSent = C.udpSent + 1
  udp:send("ping", PORT_UDP, HOST)
end, UDP_MS)

cluster.on("SIGUSR1", function()
  paused = not paused
  if paused then
    if open == 0 then statsfile:write(string.format("paused t=%.1f\n", core.hrtime() - started)) end
  else
    for _ = open + 1, CLIENTS do start_one() end
    statsfile:write(string.format("resumed t=%.1f\n", core.hrtime() - started))
  end
end)

cluster.on("SIGUSR2", function()
  collectgarbage("collect")
  collectgarbage("collect")
  local e = {}
  for code, n in pairs(errs) do e[#e + 1] = code .. ":" .. n end
  table.sort(e)
  local p = {}
  for name, n in pairs(per) do p[#p + 1] = name .. ":" .. n end
  table.sort(p)
  local o = {}
  for name, n in pairs(open_by) do if n > 0 then o[#o + 1] = name .. ":" .. n end end
  table.sort(o)
  local to = {}
  for name, n in pairs(timeouts) do to[#to + 1] = name .. ":" .. n end
  table.sort(to)
  statsfile:write(string.format(
    "sample t=%.1f heap_kb=%.1f conns=%d ok=%d failed=%d open=%d udp_sent=%d udp_answered=%d open_by=%s timeouts=%s errors=%s per=%s\n",
    core.hrtime() - started, collectgarbage("count"), C.conns, C.ok, C.failed, open, C.udpSent, C.udpAnswered,
    #o > 0 and table.concat(o, ",") or "-", #to > 0 and table.concat(to, ",") or "-", #e > 0 and table.concat(e, ",") or "-", table.concat(p, ",")))
end)

cluster.on("SIGTERM", function() os.exit(0) end)
cluster.run()
