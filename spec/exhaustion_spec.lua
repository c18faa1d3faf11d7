-- Running out of file descriptors (RLIMIT_NOFILE reached), in the master and in
-- workers: no crash, hang or busy loop; an error object with code EMFILE reaches the
-- right 'error' event or callback; everything works again once descriptors are free.
-- S.starve (fixtures/share_lib.lua) lowers a process's limit to its lowest free
-- descriptor; every spec puts the limit back before it asserts. (Other EMFILE specs:
-- sharing_none_spec, sharing_dgram_spec and sharing_rr_spec, for what the kernel drops
-- on the channel and the round-robin master's accept.)
local cluster = require "cluster"
local core = require "cluster.core"
local H = require "helper"
local S = require "fixtures.share_lib"
local X = require "fixtures.exhaust_lib"

local at, ask, answered_by = S.at, S.ask, S.answered_by
local ME = core.getpid()

-- Starves this process with room for `room` more descriptors (default none): that many
-- files, opened first, take the lowest free descriptors and are closed once starved.
-- Returns the restoring function, or nil without prlimit(1).
local function starve_self(room)
  local held = {}
  for i = 1, room or 0 do held[i] = assert(io.open("/dev/null")) end
  local restore = S.starve(ME)
  for _, f in ipairs(held) do f:close() end
  return restore
end

-- Runs fn while `restore`'s process is starved, puts the limit back, then re-raises
-- what fn raised; returns what it returned.
local function while_starved(restore, fn)
  local res = table.pack(pcall(fn))
  restore()
  assert(res[1], res[2])
  return table.unpack(res, 2, res.n)
end

-- Forks a worker running `exec` and waits for its first "ready" report.
local function fork_ready(exec)
  local w = S.fork_script(exec, 1)[1]
  assert(S.take(w, "ready"), "the worker never got ready")
  return w
end

-- Forks one worker (settings as they are) and follows it: {err=, exit=, online=}.
local function fork_followed()
  local seen = {}
  local w = cluster.fork()
  seen.worker = w
  w:on("error", function(e) seen.err = e end)
  w:on("online", function() seen.online = true end)
  w:on("exit", function(code, signal) seen.exit = { code = code, signal = signal } end)
  return seen
end

describe("running out of file descriptors", function()
  before_each(H.setup)
  after_each(function()
    S.close_tracked()
    -- (a supervisor a failed spec left running would respawn into the next spec)
    if cluster.supervisor() then pcall(cluster.shutdown, { grace = 0, killTimeout = 0 }) end
    H.teardown()
  end)

  it("a fork the master has no descriptors for (none left, or too few for the channel and pipes) gives 'error' EMFILE naming the interpreter, then 'exit' -24; cluster.workers keeps nothing, no descriptor is left behind, and the next fork comes online", function()
    cluster.setupMaster { exec = H.fixture("worker.lua"), silent = false }
    local first = fork_followed() -- (the loop's first child and stream take what they keep)
    assert(H.wait_until(function() return first.online end, 5000), "the first worker never came online")
    first.worker:kill("SIGKILL")
    assert(H.wait_until(function() return first.exit ~= nil end, 5000))
    local before = S.settled_fd_count(ME)
    -- room 0: not even the worker script can be opened; 1 to 4: the spawn fails part-way
    -- (silent: a pipe for stdout and one for stderr too); cwd: a directory that is fine
    local cases = { { 0 }, { 0, true, "/tmp" }, { 2 }, { 4, true } }
    for _, case in ipairs(cases) do
      local room, silent, cwd = case[1], case[2] == true, case[3]
      cluster.setupMaster { silent = silent, cwd = cwd or core.cwd() }
      local restore = starve_self(room)
      if not restore then pending("no prlimit(1)") return end
      local seen = while_starved(restore, function()
        local s = fork_followed()
        H.wait_until(function() return s.exit ~= nil end, 2000)
        return s
      end)
      local what = ("room %d, silent %s: "):format(room, tostring(silent))
      assert(seen.err, what .. "no 'error'")
      assert.equal("EMFILE", seen.err.code, what .. tostring(seen.err))
      assert.equal("spawn", seen.err.syscall)
      assert.equal(cluster.settings.execPath, seen.err.path, what .. tostring(seen.err))
      assert.equal("spawn EMFILE " .. cluster.settings.execPath .. " (too many open files)", tostring(seen.err))
      assert.same({ code = -24 }, seen.exit, what .. "no 'exit'")
      assert.is_nil(seen.online)
      assert.is_nil(cluster.workers[seen.worker.id])
      assert.equal(before, S.settled_fd_count(ME), what .. "descriptors left behind")
    end
    cluster.setupMaster { silent = false, cwd = core.cwd() }
    local after = fork_followed()
    assert(H.wait_until(function() return after.online end, 5000), "no fork came online after")
    after.worker:disconnect()
    H.finish()
  end)

  it("a supervisor whose forks fail with EMFILE backs off and sees a crash loop instead of forking in a busy loop; once descriptors are free its workers come up", function()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), silent = false }
    local forks, loops, ready = 0, 0, 0
    cluster.on("fork", function(w)
      forks = forks + 1
      w:on("error", function() end)
    end)
    cluster.on("crashloop", function() loops = loops + 1 end)
    cluster.on("ready", function() ready = ready + 1 end)
    local restore = starve_self()
    if not restore then pending("no prlimit(1)") return end
    while_starved(restore, function()
      cluster.supervise { workers = 2, readiness = "explicit", signals = false, intensity = 4, period = 10,
        crashLoopPause = 200, backoff = { initial = 10, factor = 2, max = 100 } }
      H.run_for(600)
    end)
    assert.is_true(forks >= 4, "forks: " .. forks)
    assert.is_true(forks <= 20, "forked " .. forks .. " times in 600 ms")
    assert.is_true(loops >= 1, "no crash loop")
    assert.equal(0, ready)
    assert(H.wait_until(function() return ready >= 2 end, 5000), "the workers never came up")
    local done = false
    cluster.shutdown({ grace = 500 }, function() done = true end)
    assert(H.wait_until(function() return done end, 5000), "shutdown never ended")
    H.finish()
  end)

  it("a reload whose new workers cannot be forked (EMFILE) fails once: one 'reloadFailed', one callback with ERR_RELOAD_FAILED, and the old workers stay", function()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), silent = false }
    local ready = 0
    cluster.on("ready", function() ready = ready + 1 end)
    cluster.on("fork", function(w) w:on("error", function() end) end)
    cluster.supervise { workers = 2, readiness = "explicit", signals = false }
    assert(H.wait_until(function() return ready == 2 end, 5000), "the workers never got ready")
    local old = {}
    for id, w in pairs(cluster.workers) do old[id] = w end
    local failed, answers = 0, {}
    cluster.on("reloadFailed", function() failed = failed + 1 end)
    local restore = starve_self()
    if not restore then pending("no prlimit(1)") return end
    while_starved(restore, function()
      cluster.reload(function(err) answers[#answers + 1] = err or "ok" end)
      H.wait_until(function() return #answers > 0 end, 2000)
      H.run_for(50) -- (a second answer would come on the next turns)
    end)
    assert.equal(1, #answers)
    assert.equal("ERR_RELOAD_FAILED", answers[1].code)
    assert.equal(1, failed)
    for id, w in pairs(old) do
      assert.is_false(w:isDead())
      assert.equal(w, cluster.workers[id])
    end
    local done = false
    cluster.shutdown({ grace = 500 }, function() done = true end)
    assert(H.wait_until(function() return done end, 5000), "shutdown never ended")
    H.finish()
  end)

  it("in a master with no descriptor left, listen, connect, dgram bind and send give EMFILE (syscalls listen, connect, bind, bind) to their 'error' or callback; once descriptors are free each works", function()
    local _, port = S.local_server(0)
    local starved
    local restore = starve_self()
    if not restore then pending("no prlimit(1)") return end
    while_starved(restore, function()
      X.try_all(port, function(r) starved = r end)
      H.wait_until(function() return starved ~= nil end, 2000)
    end)
    assert.same({ listen = "EMFILE listen", connect = "EMFILE connect", bind = "EMFILE bind", send = "EMFILE bind" }, starved)
    local again
    X.try_all(port, function(r) again = r end)
    assert(H.wait_until(function() return again ~= nil end, 2000))
    assert.same({ listen = "ok", connect = "ok", bind = "ok", send = "ok" }, again)
  end)

  it("in a worker with no descriptor left, an exclusive listen, connect, exclusive dgram bind and send give EMFILE and the worker keeps its channel; once descriptors are free each works", function()
    local _, port = S.local_server(0)
    local w = fork_ready(H.fixture("exhaust_worker.lua"))
    local restore = S.starve(w.process.pid)
    if not restore then pending("no prlimit(1)") return end
    local starved = while_starved(restore, function()
      w:send({ cmd = "try", port = port })
      return S.take(w, "tried")
    end)
    assert(starved, "the worker never answered")
    assert.same({ ev = "tried", listen = "EMFILE listen", connect = "EMFILE connect", bind = "EMFILE bind",
      send = "EMFILE bind" }, starved)
    assert.is_true(w:isConnected())
    w:send({ cmd = "try", port = port })
    assert.same({ ev = "tried", listen = "ok", connect = "ok", bind = "ok", send = "ok" }, S.take(w, "tried"))
    w:disconnect()
    H.finish()
  end)

  it("a worker that accepts itself (exclusive listen) and has no descriptor left closes the connections it cannot take (libuv's, as Node), with no 'error' and no busy loop; once descriptors are free it answers", function()
    local w = S.fork(1)[1]
    local pid = w.process.pid
    local port = S.listen(w, "own", { port = 0, host = "127.0.0.1", exclusive = true }).address.port
    local restore = S.starve(pid)
    if not restore then pending("no prlimit(1)") return end
    local records = while_starved(restore, function() return S.clients(5, at(port), 5, nil, 3000) end)
    local _, total = S.tally(records)
    assert.equal(0, total)
    for _, r in ipairs(records) do assert.is_true(r.done) end
    assert.is_false(S.has(w, "error", "own"), "the server reported an error")
    assert.is_false(w:isDead())
    assert.equal(pid, answered_by(ask(at(port))))
    S.close(w, "own") -- (an exclusive server is the worker's own: disconnect leaves it open)
    w:disconnect()
    H.finish()
  end)

  it("cluster.disconnect() while the master and its workers have no descriptor left: the callback runs, every worker exits 0, and the shared port is let go", function()
    local ws = S.fork(2)
    local port = S.listen_all(ws, "d", at(0))[1].address.port
    local exits = {}
    for _, w in ipairs(ws) do
      w:on("exit", function(code, signal) exits[#exits + 1] = { code = code, signal = signal } end)
    end
    local restores = {}
    for i, w in ipairs(ws) do restores[i] = S.starve(w.process.pid) end
    if not restores[1] then pending("no prlimit(1)") return end
    restores[#restores + 1] = starve_self()
    local done = false
    local ok, err = pcall(function()
      cluster.disconnect(function() done = true end)
      H.wait_until(function() return done and #exits == 2 end, 3000)
    end)
    restores[#restores]()
    for i = 1, #ws do pcall(restores[i]) end -- (the workers are gone)
    assert(ok, err)
    assert.is_true(done)
    assert.same({ { code = 0 }, { code = 0 } }, exits)
    assert.equal(0, cluster._sharedHandleCount())
    assert.equal("ECONNREFUSED", ask(at(port)).err.code)
    H.finish()
  end)
end)
