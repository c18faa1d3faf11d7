-- The soak master (and its workers: the same script runs in both roles).
--
-- Started by bench/soak/run; all settings come from SOAK_* environment variables that
-- the runner sets. The master keeps everything a long-lived supervisor does going at
-- once, so that anything that leaks per worker, per connection, per message, per
-- handle or per reload adds up over the run:
--
--   supervised "server" workers (cluster.supervise, readiness on 'listening', a
--     watchdog): each listens on the shared TCP port SOAK_PORT_SUP, on a unix path and
--     binds the shared UDP port; they are replaced by cluster.reload() every
--     SOAK_RELOAD_MS and scaled up and down again (cluster.scale) every 3rd reload;
--     the master sends them a nested-table message every 100 ms, answered;
--   "churn" workers (plain cluster.fork, SOAK_CHURN of them alive at once): each
--     listens on the shared TCP port SOAK_PORT_CHURN, a second unix path and the
--     shared UDP port, takes a 100 KB+ message with nested tables and echoes it, gets a
--     net socket, a net server and a dgram socket from the master (worker:send(msg,
--     handle)) and uses each, sends the master its own socket, exclusive server and
--     exclusive dgram socket, then ends by one of seven fates in turn: os.exit(0), an
--     error raised in a callback (exit 1), a master SIGKILL, a master worker:kill(),
--     a master worker:disconnect(), a worker-side cluster.worker:kill(), or closing
--     everything and letting its loop end;
--   the master itself connects to the supervised port every 50 ms (a client in the
--     master, both policies), runs an echo server for the sockets the workers pass,
--     and creates and clears timers.
--
-- Signals (from the runner):
--   SIGUSR2  write one sample line to SOAK_STATS: the Lua heap after a full collect,
--            the churn counters and the sizes of the cluster's internal tables
--   SIGUSR1  toggle quiet: no new churn workers, no reloads, no master clients or
--            handle exchanges; once only the supervised workers are left, all ready,
--            and nothing is in flight, a line "quiet" is written (the runner then
--            samples); SIGUSR1 again resumes
--   SIGTERM  the supervisor's graceful shutdown, then exit 0
local cluster = require "cluster"
local net = require "cluster.net"
local dgram = require "cluster.dgram"
local core = require "cluster.core"

local settings = dofile((arg[0]:match("^(.*)/") or ".") .. "/settings.lua")
local env_num = settings.env_num
local HOST, PORT_SUP, PORT_CHURN, PORT_UDP = settings.HOST, settings.PORT_SUP, settings.PORT_CHURN, settings.PORT_UDP
local DIR, UNIX_SUP, UNIX_CHURN = settings.DIR, settings.UNIX_SUP, settings.UNIX_CHURN

local RESPONSE = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
local RESPONSE_CLOSE = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"

-- A minimal HTTP/1.1 responder (keep-alive unless the request says close).
local DEBUG = os.getenv("SOAK_DEBUG")
local live_sockets = setmetatable({}, { __mode = "k" })
local function http_connection(socket)
  if DEBUG then
    live_sockets[socket] = { at = core.hrtime(), reads = 0 }
    socket:on("close", function() live_sockets[socket] = nil end)
  end
  local buf = ""
  socket:on("data", function(chunk)
    if DEBUG and live_sockets[socket] then live_sockets[socket].reads = live_sockets[socket].reads + 1 end
    buf = buf .. chunk
    while true do
      local e = buf:find("\r\n\r\n", 1, true)
      if not e then break end
      local req = buf:sub(1, e + 3)
      buf = buf:sub(e + 4)
      if req:find("Connection: close", 1, true) then
        socket:write(RESPONSE_CLOSE)
        socket:destroySoon()
        return
      end
      socket:write(RESPONSE)
    end
  end)
  socket:on("error", function() end)
end

-- A nested table with every kind of value a message may hold.
local function nested(depth, width)
  local t = { n = depth, f = depth + 0.5, s = ("x"):rep(depth), b = depth % 2 == 0, list = {} }
  for i = 1, width do t.list[i] = { i, i * 1.25, tostring(i), i % 3 == 0 } end
  if depth > 0 then t.child = nested(depth - 1, width) end
  return t
end

-- ===========================================================================
-- Worker roles
-- ===========================================================================

if cluster.isWorker then
  local role = os.getenv("SOAK_ROLE")
  local w = cluster.worker

  if role == "server" then
    local srv = net.createServer(http_connection)
    srv:on("error", function(err) io.stderr:write("sup listen: " .. tostring(err) .. "\n") end)
    srv:listen(PORT_SUP, HOST)
    local usrv = net.createServer(http_connection)
    usrv:on("error", function(err) io.stderr:write("sup unix listen: " .. tostring(err) .. "\n") end)
    usrv:listen(UNIX_SUP)
    local udp
    udp = dgram.createSocket("udp4", function(msg, rinfo) udp:send("pong", rinfo.port, rinfo.address) end)
    udp:on("error", function() end)
    udp:bind(PORT_UDP, HOST)
    w:on("message", function(msg)
      if type(msg) == "table" and msg.cmd == "ping" then
        w:send({ cmd = "pong", seq = msg.seq, echo = msg.body })
      end
    end)
    cluster.run()
    return
  end

  -- role == "churn"
  local fate = os.getenv("SOAK_FATE")
  local srv = net.createServer(http_connection)
  srv:on("error", function(err) io.stderr:write("soak: worker " .. w.id .. " churn tcp listen: " .. tostring(err) .. "\n") end)
  srv:listen(PORT_CHURN, HOST)
  local usrv = net.createServer(http_connection)
  usrv:on("error", function(err) io.stderr:write("soak: worker " .. w.id .. " churn unix listen: " .. tostring(err) .. "\n") end)
  usrv:listen(UNIX_CHURN)
  local udp
  udp = dgram.createSocket("udp4", function(msg, rinfo) udp:send("pong", rinfo.port, rinfo.address) end)
  udp:on("error", function(err) io.stderr:write("soak: worker " .. w.id .. " churn udp bind: " .. tostring(err) .. "\n") end)
  udp:bind(PORT_UDP, HOST)
  -- timers created and cleared
  local ticker = cluster.setInterval(function()
    local t = cluster.setTimeout(function() end, 1000)
    cluster.clearTimeout(t)
  end, 20)

  -- (a ref'd timer keeps a worker alive after disconnect, as in Node: it goes then)
  w:on("disconnect", function() cluster.clearInterval(ticker) end)

  local function dump_later()
    if not DEBUG then return end
    cluster.setTimeout(function()
      local f = io.open(DIR .. "/debug-" .. w.id .. ".txt", "a")
      for sock, info in pairs(live_sockets) do
        f:write(string.format("worker %d fate %s: open socket since %.3fs ago reads=%d bytesRead=%s bytesWritten=%s destroyed=%s paused=%s reading=%s ending=%s destroySoon=%s remote=%s\n",
          w.id, fate, core.hrtime() - info.at, info.reads, tostring(sock.bytesRead), tostring(sock.bytesWritten),
          tostring(sock.destroyed), tostring(sock._paused), tostring(sock._reading), tostring(sock._ending),
          tostring(sock._destroySoon), tostring(sock.remoteAddress)))
      end
      f:close()
    end, 2000):unref()
  end
  w:on("disconnect", dump_later)

  local function leave()
    dump_later()
    cluster.clearInterval(ticker)
    srv:close()
    usrv:close()
    udp:close()
    w:off("message")
  end

  local handlers = {}

  function handlers.big(msg) w:send({ cmd = "big", blob = msg.blob, tree = msg.tree }) end

  -- a connected socket from the master: one request/answer with the master's echo server
  function handlers.sock(msg, sock)
    if not sock then return w:send({ cmd = "sockDone", ok = false }) end
    local done = false
    sock:on("data", function()
      if done then return end
      done = true
      sock:destroy()
      w:send({ cmd = "sockDone", ok = true })
    end)
    sock:on("error", function() end)
    sock:write("from worker\n")
  end

  -- a listening server from the master: connect to it and make it answer
  function handlers.server(msg, server)
    if not server then return w:send({ cmd = "serverDone", ok = false }) end
    server:on("connection", function(s)
      s:on("error", function() end)
      s:write("hi")
      s:close()
    end)
    server:on("error", function() end)
    local c = net.connect(msg.port, HOST)
    c:on("error", function() end)
    c:on("data", function() end)
    c:on("close", function()
      server:close()
      w:send({ cmd = "serverDone", ok = true })
    end)
  end

  -- a bound UDP socket from the master: send a datagram to itself
  function handlers.udp(msg, sock)
    if not sock then return w:send({ cmd = "udpDone", ok = false }) end
    -- (the master's copy is bound until its send callback closes it, and may read the
    -- datagram itself: send again until one arrives here)
    local again
    sock:on("error", function() end)
    sock:on("message", function()
      if not again then return end
      cluster.clearInterval(again)
      again = nil
      sock:close()
      w:send({ cmd = "udpDone", ok = true })
    end)
    sock:send("self", msg.port, HOST)
    again = cluster.setInterval(function() sock:send("self", msg.port, HOST) end, 100)
  end

  -- the worker's own objects, sent to the master
  function handlers.giveSock(msg)
    local c
    c = net.connect(msg.port, HOST, function()
      w:send({ cmd = "wsock" }, c)
    end)
    c:on("error", function() end)
  end

  function handlers.giveServer()
    local s = net.createServer(function(conn)
      conn:on("error", function() end)
      conn:destroy()
    end)
    s:on("error", function() end)
    s:listen({ port = 0, host = HOST, exclusive = true }, function()
      w:send({ cmd = "wserver", port = s:address().port }, s, function() s:close() end)
    end)
  end

  function handlers.giveUdp()
    local u = dgram.createSocket("udp4")
    u:on("error", function() end)
    u:bind({ port = 0, address = HOST, exclusive = true }, function()
      w:send({ cmd = "wudp", port = u:address().port }, u, function() u:close() end)
    end)
  end

  -- fates the worker carries out itself
  function handlers.exit() os.exit(0) end
  function handlers.crash() error("soak: a deliberate crash in worker " .. w.id) end
  function handlers.wkill() w:kill() end
  handlers["leave"] = leave

  w:on("message", function(msg, handle)
    local fn = type(msg) == "table" and handlers[msg.cmd]
    if fn then fn(msg, handle) elseif handle then
      if handle.destroy then handle:destroy() else handle:close() end
    end
  end)
  cluster.run()
  return
end

-- ===========================================================================
-- Master
-- ===========================================================================

local STATS = assert(os.getenv("SOAK_STATS"), "SOAK_STATS is not set (run bench/soak/run)")
local CHURN = env_num("SOAK_CHURN", 4)
local SUP_WORKERS = env_num("SOAK_SUP_WORKERS", 2)
local RELOAD_MS = env_num("SOAK_RELOAD_MS", 15000)
local LINGER_MS = env_num("SOAK_LINGER_MS", 300)
local BIG = env_num("SOAK_BIG_BYTES", 150 * 1024)
local STUCK_MS = env_num("SOAK_STUCK_MS", 15000)

-- glibc's malloc statistics, when bench/soak/run could build bench/soak/mallinfo.c
local mallinfo = nil
do
  local ok, m = pcall(require, "soak_mallinfo")
  if ok then mallinfo = m end
end

local started = core.hrtime()
local function elapsed() return core.hrtime() - started end

local statsfile = assert(io.open(STATS, "a"))
statsfile:setvbuf("line")
local function stat_line(s) statsfile:write(s, "\n") end

local C = {                  -- counters, all cumulative
  forked = 0, exited = 0, churnForked = 0, churnExited = 0, supForked = 0,
  msgsOut = 0, msgsIn = 0, bytesOut = 0, bytesIn = 0,
  handlesOut = 0, handlesIn = 0, handleFails = 0,
  masterConns = 0, masterConnErrs = 0, echoConns = 0,
  reloads = 0, reloadFails = 0, scales = 0, outputLines = 0, stuck = 0, timers = 0,
  workerErrors = 0,
}
local fates_seen = {}

local FATES = { "exit", "crash", "sigkill", "kill", "disconnect", "wkill", "leave" }
local next_fate = 0

local quiet = false          -- SIGUSR1: wind down and report "quiet"
local stopping = false
local inflight = 0           -- master-side clients and handle exchanges under way

-- Every object the master opens for the churn (clients, passed sockets, servers and
-- dgram sockets, both directions) counts as in flight until its 'close'.
local open_objects = 0
local open_kinds = {}      -- obj -> what it is, while open
local function track(obj, kind)
  inflight = inflight + 1
  open_objects = open_objects + 1
  open_kinds[obj] = string.format("%s@%.1f", kind, elapsed())
  obj:once("close", function()
    inflight = inflight - 1
    open_objects = open_objects - 1
    open_kinds[obj] = nil
  end)
  return obj
end

local BLOB = ("0123456789abcdef"):rep(BIG // 16 + 1):sub(1, BIG)
local TREE = nested(12, 8)

-- The master's echo server: sockets passed by workers connect to it.
local echo = net.createServer(function(s)
  C.echoConns = C.echoConns + 1
  track(s, "echo-accepted")
  s:on("error", function() end)
  s:on("data", function(chunk) s:write(chunk) end)
end)
echo:listen(0, HOST)

cluster.setupMaster { exec = arg[0], silent = true }

cluster.on("fork", function(w) C.forked = C.forked + 1 end)
local exitlog = DEBUG and io.open(DIR .. "/exits.txt", "a")
cluster.on("exit", function(w, code, signal)
  C.exited = C.exited + 1
  if exitlog then
    exitlog:write(string.format("%.3f exit %d %s %s pid=%s\n", elapsed(), w.id, tostring(w._soakFate), tostring(signal or code), tostring(w.process.pid)))
    exitlog:flush()
  end
  local f = w._soakFate
  if f then fates_seen[f .. ":" .. tostring(signal or code)] = (fates_seen[f .. ":" .. tostring(signal or code)] or 0) + 1 end
end)
cluster.on("message", function(w, msg)
  C.msgsIn = C.msgsIn + 1
  if type(msg) == "table" and type(msg.blob) == "string" then C.bytesIn = C.bytesIn + #msg.blob end
end)

local function count_out(msg)
  C.msgsOut = C.msgsOut + 1
  if type(msg) == "table" and type(msg.blob) == "string" then C.bytesOut = C.bytesOut + #msg.blob end
end

-- ---------------------------------------------------------------------------
-- the supervisor

cluster.supervise {
  workers = SUP_WORKERS,
  env = { SOAK_ROLE = "server" },
  watchdog = { interval = 500, timeout = 10000 },
  grace = 2000, killTimeout = 2000,
  -- worker output is counted; the harness's own diagnostics ("soak: ...") are printed
  output = function(w, stream, line)
    C.outputLines = C.outputLines + 1
    if line:find("^soak: ") then io.stderr:write(line, "\n") end
  end,
}

local reloading = false
local reload_round = 0
local scale_timer = nil
local function do_reload()
  if quiet or stopping or reloading then return end
  reloading = true
  reload_round = reload_round + 1
  cluster.reload(function(err)
    reloading = false
    if err then C.reloadFails = C.reloadFails + 1 else C.reloads = C.reloads + 1 end
    if reload_round % 3 == 0 and not quiet and not stopping then
      C.scales = C.scales + 1
      cluster.scale(SUP_WORKERS + 1)
      scale_timer = cluster.setTimeout(function()
        scale_timer = nil
        cluster.scale(SUP_WORKERS)
      end, 1000)
    end
  end)
end
-- (SOAK_RELOAD_MS=0: no reloads, so the supervised workers live as long as the master)
local reload_timer = RELOAD_MS > 0 and cluster.setInterval(do_reload, RELOAD_MS) or nil

-- nested-table messages to every supervised worker, answered
local ping_seq = 0
cluster.setInterval(function()
  for _, w in pairs(cluster.workers) do
    if w._supervised and w:isConnected() then
      ping_seq = ping_seq + 1
      local msg = { cmd = "ping", seq = ping_seq, body = TREE }
      w:send(msg)
      count_out(msg)
    end
  end
end, 100)

-- The block cache under the Lua allocator fills up to 4 MB and then gives everything
-- back (README, "Memory"): the runner's warm-up waits for the first such cycle, by
-- which time the master's RSS has reached its working size.
local cache_cycles, cache_last = 0, 0
local block_cache_bytes = core.block_cache_bytes

-- timers created and cleared, also from other timers' callbacks
cluster.setInterval(function()
  local cached = block_cache_bytes and block_cache_bytes()
  if cached then
    if cached < cache_last // 2 and cache_last > 2 * 2 ^ 20 then cache_cycles = cache_cycles + 1 end
    cache_last = cached
  end
  local list = {}
  for i = 1, 10 do
    list[i] = cluster.setTimeout(function() C.timers = C.timers + 1 end, 1 + i)
  end
  for i = 1, 10, 2 do cluster.clearTimeout(list[i]) end
  local iv = cluster.setInterval(function() end, 5)
  cluster.setTimeout(function() cluster.clearInterval(iv) end, 20)
  cluster.defer(function() C.timers = C.timers + 1 end)
end, 50)

-- ---------------------------------------------------------------------------
-- master-side clients of the supervised port

cluster.setInterval(function()
  if quiet or stopping then return end
  local c = track(net.connect(PORT_SUP, HOST), "client")
  c:on("connect", function() c:write("GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n") end)
  c:on("data", function() end)
  c:on("error", function() C.masterConnErrs = C.masterConnErrs + 1 end)
  c:on("close", function() C.masterConns = C.masterConns + 1 end)
end, 50)

-- ---------------------------------------------------------------------------
-- churn workers

local churn_alive = 0
local fork_churn

-- What the master does with a churn worker once it is online: the exchanges, then its fate.
local function drive(w)
  local steps = { "big", "sock", "server", "udp", "giveSock", "giveServer", "giveUdp" }
  local pending = 0
  local finished = false
  local function step_done()
    pending = pending - 1
    if pending == 0 and not finished then
      finished = true
      cluster.setTimeout(function()
        if w:isDead() then return end
        w._soakFateDone = true
        local fate = w._soakFate
        if fate == "sigkill" then w:kill("SIGKILL")
        elseif fate == "kill" then w:kill()
        elseif fate == "disconnect" then w:disconnect()
        else
          local m = { cmd = fate == "crash" and "crash" or fate }
          w:send(m)
          count_out(m)
        end
      end, math.random(0, LINGER_MS))
    end
  end
  local expect = {
    big = "big", sock = "sockDone", server = "serverDone", udp = "udpDone",
    giveSock = "wsock", giveServer = "wserver", giveUdp = "wudp",
  }
  local waiting = {}
  w._soakWaiting = waiting
  w:on("message", function(msg, handle)
    if type(msg) ~= "table" then return end
    if handle then
      C.handlesIn = C.handlesIn + 1
      track(handle, "received-" .. tostring(msg.cmd))
    end
    if msg.cmd == "wsock" and handle then
      handle:on("error", function() end)
      handle:on("data", function() handle:destroy() end)
      handle:write("from master\n")
    elseif msg.cmd == "wserver" and handle then
      -- (the worker's copy may take the connection before it closes: the master's copy
      -- closes once its client is done, whichever copy served it)
      local function close_server() if handle.listening then handle:close() end end
      handle:on("error", function() end)
      handle:on("connection", function(s) s:on("error", function() end) s:destroy() close_server() end)
      local c = track(net.connect(msg.port, HOST), "client-of-wserver")
      c:on("error", function() end)
      c:on("data", function() end)
      c:on("close", close_server)
    elseif msg.cmd == "wudp" and handle then
      handle:on("error", function() end)
      handle:close()
    end
    if msg.ok == false then C.handleFails = C.handleFails + 1 end
    for step, reply in pairs(expect) do
      if reply == msg.cmd and waiting[step] then
        waiting[step] = nil
        step_done()
      end
    end
  end)
  for _, step in ipairs(steps) do
    pending = pending + 1
    waiting[step] = true
    if step == "big" then
      local m = { cmd = "big", blob = BLOB, tree = TREE }
      w:send(m)
      count_out(m)
    elseif step == "sock" then
      local c
      c = track(net.connect(echo:address().port, HOST, function()
        C.handlesOut = C.handlesOut + 1
        w:send({ cmd = "sock" }, c)
      end), "sent-sock")
      c:on("error", function() end)
    elseif step == "server" then
      -- (both copies listen until the master's closes: either may take the worker's
      -- connection, and answers it the same way)
      local s = track(net.createServer(function(conn)
        conn:on("error", function() end)
        conn:write("hi")
        conn:close()
      end), "sent-server")
      s:on("error", function() end)
      s:listen(0, HOST, function()
        C.handlesOut = C.handlesOut + 1
        w:send({ cmd = "server", port = s:address().port }, s, function() s:close() end)
      end)
    elseif step == "udp" then
      local u = track(dgram.createSocket("udp4"), "sent-udp")
      u:on("error", function() end)
      u:bind(0, HOST, function()
        C.handlesOut = C.handlesOut + 1
        w:send({ cmd = "udp", port = u:address().port }, u, function() u:close() end)
      end)
    else
      local m = { cmd = step, port = echo:address().port }
      w:send(m)
      count_out(m)
    end
  end
end

function fork_churn()
  if quiet or stopping then return end
  next_fate = next_fate % #FATES + 1
  local fate = FATES[next_fate]
  local w = cluster.fork { SOAK_ROLE = "churn", SOAK_FATE = fate }
  w._soakFate = fate
  churn_alive = churn_alive + 1
  C.churnForked = C.churnForked + 1
  local stuck = cluster.setTimeout(function()
    if not w:isDead() then
      C.stuck = C.stuck + 1
      local steps = {}
      for step in pairs(w._soakWaiting or {}) do steps[#steps + 1] = step end
      table.sort(steps)
      io.stderr:write(string.format("soak: churn worker %d (%s) stuck in state %s (%s): SIGKILL; its descriptors:\n",
        w.id, fate, w.state, w._soakWaiting and (#steps > 0 and "waiting for " .. table.concat(steps, ",")
          or "exchanges done, fate " .. (w._soakFateDone and "carried out" or "not yet due")) or "not yet online"))
      local pid = w.process.pid
      local p = pid and io.popen("ls -l /proc/" .. pid .. "/fd 2>&1; ss -xtunap 2>/dev/null | grep 'pid=" .. pid .. ",'; ss -xtunap > " .. DIR .. "/ss-stuck-" .. w.id .. ".txt 2>&1")
      if p then io.stderr:write(p:read("a")) p:close() end
      w:kill("SIGKILL")
    end
  end, STUCK_MS)
  w:on("error", function() C.workerErrors = C.workerErrors + 1 end)
  w:once("listening", function() end)
  w:once("online", function() drive(w) end)
  w:once("exit", function()
    cluster.clearTimeout(stuck)
    churn_alive = churn_alive - 1
    C.churnExited = C.churnExited + 1
    cluster.defer(fork_churn)
  end)
end

cluster.setTimeout(function()
  for _ = 1, CHURN do fork_churn() end
end, 200)

-- ---------------------------------------------------------------------------
-- sampling and quiet

local function count(t) local n = 0 for _ in pairs(t) do n = n + 1 end return n end

local function sample(tag)
  collectgarbage("collect")
  collectgarbage("collect")
  local heap = collectgarbage("count")
  local sup_n = 0
  for _, w in pairs(cluster._all) do if w._supervised then sup_n = sup_n + 1 end end
  local fields = {
    "sample", tag, string.format("t=%.1f", elapsed()), string.format("heap_kb=%.1f", heap),
    "forked=" .. C.forked, "exited=" .. C.exited, "churn=" .. C.churnExited,
    "msgs=" .. (C.msgsIn + C.msgsOut), "msgs_in=" .. C.msgsIn, "msgs_out=" .. C.msgsOut,
    string.format("big_mb=%.1f", (C.bytesIn + C.bytesOut) / 2 ^ 20),
    "handles_out=" .. C.handlesOut, "handles_in=" .. C.handlesIn, "handle_fails=" .. C.handleFails,
    "master_conns=" .. C.masterConns, "master_conn_errs=" .. C.masterConnErrs, "echo_conns=" .. C.echoConns,
    "reloads=" .. C.reloads, "reload_fails=" .. C.reloadFails, "scales=" .. C.scales,
    "output_lines=" .. C.outputLines, "stuck=" .. C.stuck, "timers=" .. C.timers,
    "worker_errors=" .. C.workerErrors, "open_objects=" .. open_objects, "churn_alive=" .. churn_alive,
    -- the cluster's internal tables
    "t_workers=" .. count(cluster.workers), "t_all=" .. count(cluster._all), "sup_all=" .. sup_n,
    "t_entries=" .. (cluster._sharedHandleCount and cluster._sharedHandleCount() or -1),
    "block_cache=" .. tostring(core.block_cache_bytes and core.block_cache_bytes() or "nil"),
    "cache_cycles=" .. (block_cache_bytes and block_cache_bytes() and cache_cycles or -1),
  }
  if mallinfo then
    local mi = mallinfo.stats()
    fields[#fields + 1] = "malloc_in_use=" .. mi.in_use
    fields[#fields + 1] = "malloc_free=" .. mi.free
  end
  for ev in pairs { exit = 1, message = 1, fork = 1, online = 1, listening = 1, disconnect = 1, output = 1 } do
    fields[#fields + 1] = "l_" .. ev .. "=" .. cluster:listenerCount(ev)
  end
  stat_line(table.concat(fields, " "))
end

local function is_quiet()
  if churn_alive > 0 or inflight > 0 or reloading or scale_timer then return false end
  local n = 0
  for _, w in pairs(cluster._all) do
    if not w._supervised or not w._ready or w:isDead() then return false end
    n = n + 1
  end
  return n == SUP_WORKERS
end

local quiet_timer
cluster.on("SIGUSR1", function()
  quiet = not quiet
  if quiet then
    local since = elapsed()
    local said = since
    quiet_timer = cluster.setInterval(function()
      if elapsed() - said >= 5 then
        said = elapsed()
        local states = {}
        for id, w in pairs(cluster._all) do
          states[#states + 1] = string.format("%d:%s%s%s", id, w.state, w._supervised and ":sup" or "", w._ready and ":ready" or "")
        end
        local kinds = {}
        for _, k in pairs(open_kinds) do kinds[#kinds + 1] = k end
        stat_line(string.format("waiting t=%.1f churn_alive=%d inflight=%d open_objects=%d(%s) reloading=%s all=%s",
          elapsed(), churn_alive, inflight, open_objects, table.concat(kinds, ","), tostring(reloading),
          table.concat(states, ",")))
      end
      if is_quiet() then
        cluster.clearInterval(quiet_timer)
        quiet_timer = nil
        stat_line(string.format("quiet t=%.1f", elapsed()))
      end
    end, 20)
  else
    if quiet_timer then cluster.clearInterval(quiet_timer) quiet_timer = nil end
    for _ = churn_alive + 1, CHURN do fork_churn() end
    stat_line(string.format("resumed t=%.1f", elapsed()))
  end
end)

cluster.on("SIGUSR2", function() sample(quiet and "Q" or "R") end)

cluster.on("SIGTERM", function()
  if stopping then os.exit(1) end
  stopping = true
  if reload_timer then cluster.clearInterval(reload_timer) end
  stat_line(string.format("stopping t=%.1f", elapsed()))
  cluster.shutdown({ grace = 1000, killTimeout = 1000 }, function()
    stat_line(string.format("stopped t=%.1f", elapsed()))
    os.exit(0)
  end)
end)
cluster.on("SIGINT", function() os.exit(130) end)

cluster.once("ready", function() stat_line(string.format("ready t=%.1f", elapsed())) end)

cluster.run()
