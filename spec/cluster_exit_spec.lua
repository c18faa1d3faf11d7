-- How workers end: kill from the master, kill/disconnect from the worker, exit codes and
-- signal names, cluster.disconnect. Node's test-cluster-worker-exit, -worker-kill,
-- -worker-kill-signal, -kill-disconnect, -worker-forced-exit, -worker-destroy,
-- -worker-disconnect, -disconnect-with-no-workers, -disconnect-exitedAfterDisconnect-race.
local cluster = require "cluster"
local H = require "helper"

-- Records what a worker's and the cluster's events saw, Node-test style.
local function watch(w)
  local r = { worker_disconnect = 0, worker_exit = 0, cluster_disconnect = 0, cluster_exit = 0 }
  w:on("disconnect", function()
    r.worker_disconnect = r.worker_disconnect + 1
    r.state_at_disconnect = w.state
    r.flag_at_disconnect = w.exitedAfterDisconnect
    r.connected_at_disconnect = w:isConnected()
  end)
  w:on("exit", function(code, signal)
    r.worker_exit = r.worker_exit + 1
    r.code, r.signal = code, signal
    r.flag_at_exit = w.exitedAfterDisconnect
    r.died = not H.alive(w.process.pid)
  end)
  cluster.on("disconnect", function(cw) if cw == w then r.cluster_disconnect = r.cluster_disconnect + 1 end end)
  cluster.on("exit", function(cw, code, signal)
    if cw == w then
      r.cluster_exit = r.cluster_exit + 1
      r.cluster_code, r.cluster_signal = code, signal
    end
  end)
  function r.done() return r.cluster_exit >= 1 and r.cluster_disconnect >= 1 end
  return r
end

describe("cluster worker exit", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("worker.lua") }
  end)
  after_each(H.teardown)

  it("master kill(sig) only signals: the exit reports the signal name and exitedAfterDisconnect is false", function()
    local cases = { { nil, "SIGTERM" }, { "SIGTERM", "SIGTERM" }, { "SIGKILL", "SIGKILL" },
                    { "SIGUSR1", "SIGUSR1" }, { 9, "SIGKILL" } }
    local results = {}
    for i, c in ipairs(cases) do
      local w = cluster.fork()
      local r = watch(w)
      results[i] = r
      w:on("online", function() w:kill(c[1]) end)
    end
    assert.is_true(H.wait_until(function()
      for _, r in ipairs(results) do if not r.done() then return false end end
      return true
    end, 5000))
    for i, c in ipairs(cases) do
      local r = results[i]
      assert.is_nil(r.code, "code for " .. tostring(c[1]))
      assert.equal(c[2], r.signal)
      assert.equal(c[2], r.cluster_signal)
      assert.is_false(r.flag_at_exit)
      assert.is_false(r.flag_at_disconnect)
      assert.is_true(r.died)
    end
    H.finish()
  end)

  it("master kill() does nothing but signal: a worker that handles SIGTERM stays alive and connected", function()
    local w = cluster.fork({ FIXTURE_MODE = "ignore_term" })
    w:on("disconnect", H.expect(nil, 0))
    local got
    w:on("message", function(m)
      -- 'online' comes before the worker's script runs: wait for its handler
      if m == "handling SIGTERM" then w:kill() else got = m end
    end)
    assert.is_true(H.wait_until(function() return got ~= nil end, 5000))
    assert.equal("got SIGTERM", got)
    H.run_for(50)
    assert.is_true(w:isConnected())
    assert.is_false(w:isDead())
    assert.is_nil(w.exitedAfterDisconnect)
    assert.equal(w, cluster.workers[w.id])
    w:off("disconnect")
    w:kill("SIGKILL")
    H.finish()
  end)

  it("workers whose script simply ends exit 0, never by a signal (many, to catch a crash at exit)", function()
    local N, batch = 60, 6
    local results, started = {}, 0
    local function start()
      started = started + 1
      local w = cluster.fork({ FIXTURE_MODE = "end" })
      w:on("exit", function(code, signal)
        results[#results + 1] = tostring(code) .. "/" .. tostring(signal)
        if started < N then start() end
      end)
    end
    for _ = 1, batch do start() end
    assert.is_true(H.wait_until(function() return #results == N end, 20000))
    local bad = {}
    for _, r in ipairs(results) do if r ~= "0/nil" then bad[#bad + 1] = r end end
    assert.same({}, bad)
    H.finish()
  end)

  it("a worker that stops listening for messages, by off or either removeAllListeners, exits 0", function()
    local exits = {}
    for _, how in ipairs { "off", "removeAllListeners('message')", "removeAllListeners()" } do
      local w = cluster.fork()
      w:on("online", function() w:send({ cmd = "unlisten", how = how }) end)
      w:on("exit", function(code, signal) exits[how] = tostring(code) .. "/" .. tostring(signal) end)
    end
    assert.is_true(H.wait_until(function() return exits["removeAllListeners()"] ~= nil end, 5000),
      "the worker that called removeAllListeners() is still alive")
    assert.is_true(H.wait_until(function() return next(cluster.workers) == nil end, 5000))
    assert.same({ off = "0/nil", ["removeAllListeners('message')"] = "0/nil", ["removeAllListeners()"] = "0/nil" }, exits)
    H.finish()
  end)

  it("worker:kill('SIGINT') ends a worker in its loop, with signal SIGINT (lua5.4's own Ctrl-C handler set aside)", function()
    local w = cluster.fork()
    local code, signal
    -- its echo comes from inside cluster.run() (before it, lua5.4's handler applies)
    w:on("online", function() w:send("ping") end)
    w:on("message", function() w:kill("SIGINT") end)
    w:on("exit", function(c, s) code, signal = c, s end)
    assert.is_true(H.wait_until(function() return signal ~= nil or code ~= nil end, 3000), "the worker is still alive")
    assert.is_nil(code)
    assert.equal("SIGINT", signal)
    H.finish()
  end)

  it("a worker runs in a process group of its own: the terminal's signals (Ctrl-C) reach the master only", function()
    local w = cluster.fork()
    local online = false
    w:on("online", function() online = true end)
    assert.is_true(H.wait_until(function() return online end, 5000))
    -- /proc/<pid>/stat: pid (comm) state ppid pgrp session ...
    local function ids(pid)
      local stat = H.read_file("/proc/" .. pid .. "/stat")
      local pgrp, session = stat:match("%) %S+ %d+ (%d+) (%d+)")
      return pgrp, session
    end
    local master_pgrp, master_session = ids(require("cluster.core").getpid())
    local pgrp, session = ids(w.process.pid)
    assert.equal(tostring(w.process.pid), pgrp)
    assert.are_not.equal(master_pgrp, pgrp)
    assert.equal(master_session, session) -- (the same session: the scheduler groups by session)
    w:kill()
    H.finish()
  end)

  it("reports a worker's own exit code with no signal", function()
    local r = {}
    for _, code in ipairs { 0, 1, 7, 255 } do
      local w = cluster.fork({ FIXTURE_MODE = "exit", FIXTURE_CODE = tostring(code) })
      w:on("exit", function(c, s) r[code] = { c, s } end)
    end
    assert.is_true(H.wait_until(function() return r[0] and r[1] and r[7] and r[255] end, 5000))
    for _, code in ipairs { 0, 1, 7, 255 } do
      assert.equal(code, r[code][1])
      assert.is_nil(r[code][2])
    end
    H.finish()
  end)

  it("worker-exit (Node test-cluster-worker-exit): a worker that exits 42 gives one 'disconnect' and one 'exit', code 42, no signal, exitedAfterDisconnect false", function()
    local w = cluster.fork()
    local r = watch(w)
    w:on("online", function() w:send({ cmd = "exit", code = 42 }) end)
    assert.is_true(H.wait_until(r.done, 5000))
    H.run_for(20)
    assert.equal(1, r.cluster_disconnect)
    assert.equal(1, r.cluster_exit)
    assert.equal(1, r.worker_disconnect)
    assert.equal(1, r.worker_exit)
    assert.equal(42, r.code)
    assert.equal(42, r.cluster_code)
    assert.is_nil(r.signal)
    assert.is_nil(r.cluster_signal)
    assert.equal("disconnected", r.state_at_disconnect)
    assert.is_false(r.flag_at_disconnect)
    assert.is_true(r.died)
    H.finish()
  end)

  it("worker-kill (Node test-cluster-worker-kill): worker.process:kill('SIGKILL') gives one 'disconnect' and one 'exit', signal SIGKILL, suicide false", function()
    local w = cluster.fork()
    local r = watch(w)
    w:on("online", function() w.process:kill("SIGKILL") end)
    assert.is_true(H.wait_until(r.done, 5000))
    H.run_for(20)
    assert.equal(1, r.cluster_disconnect)
    assert.equal(1, r.cluster_exit)
    assert.equal(1, r.worker_disconnect)
    assert.equal(1, r.worker_exit)
    assert.is_nil(r.code)
    assert.equal("SIGKILL", r.signal)
    assert.is_nil(r.cluster_code)
    assert.equal("SIGKILL", r.cluster_signal)
    assert.equal("disconnected", r.state_at_disconnect)
    assert.is_false(r.flag_at_disconnect)
    assert.is_false(w.suicide)
    assert.is_true(r.died)
    H.finish()
  end)

  it("worker-kill-signal (Node test-cluster-worker-kill-signal): worker:kill('SIGKILL') ends the worker with that signal", function()
    local w = cluster.fork()
    local r = watch(w)
    w:once("online", H.expect(function() w:kill("SIGKILL") end))
    assert.is_true(H.wait_until(r.done, 5000))
    assert.equal(1, r.worker_disconnect)
    assert.equal(1, r.worker_exit)
    assert.equal("disconnected", r.state_at_disconnect)
    assert.is_false(r.flag_at_disconnect)
    assert.is_nil(r.code)
    assert.equal("SIGKILL", r.signal)
    assert.is_true(r.died)
    H.finish()
  end)

  it("kill-disconnect (Node test-cluster-kill-disconnect): worker-side kill() and disconnect() exit 0 with exitedAfterDisconnect true on both events", function()
    local rs = {}
    for _, action in ipairs { "disconnect", "kill" } do
      local w = cluster.fork({ FIXTURE_MODE = action })
      rs[action] = watch(w)
    end
    assert.is_true(H.wait_until(function() return rs.disconnect.done() and rs.kill.done() end, 5000))
    for action, r in pairs(rs) do
      assert.equal(0, r.code, action)
      assert.is_nil(r.signal, action)
      assert.is_true(r.flag_at_disconnect, action)
      assert.is_true(r.flag_at_exit, action)
      assert.equal(1, r.worker_disconnect, action)
      assert.equal(1, r.worker_exit, action)
    end
    H.finish()
  end)

  it("worker-side kill() and disconnect() sent as commands after 'online' also exit 0 with exitedAfterDisconnect true", function()
    local rs, ws = {}, {}
    for _, action in ipairs { "disconnect", "kill" } do
      local w = cluster.fork()
      ws[action] = w
      rs[action] = watch(w)
      w:on("online", function()
        assert.is_nil(w.exitedAfterDisconnect)
        w:send({ cmd = action })
      end)
    end
    assert.is_true(H.wait_until(function() return rs.disconnect.done() and rs.kill.done() end, 5000))
    for action, r in pairs(rs) do
      assert.equal(0, r.code, action)
      assert.is_true(r.flag_at_exit, action)
      assert.is_true(ws[action].suicide, action)
    end
    H.finish()
  end)

  it("worker-forced-exit (Node test-cluster-worker-forced-exit): a worker disconnected on purpose runs its 'disconnect' listener; one whose channel closes unexpectedly exits 0", function()
    local m = H.spawn_master(H.fixture("master_forced.lua"))
    assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000))
    local out = H.read_file(m.out)
    assert.equal(0, H.master_status(m), H.read_file(m.err))
    assert.truthy(out:find("disconnect 42 nil\n", 1, true), out)
    assert.truthy(out:find("close 0 nil\n", 1, true), out)
    H.cleanup_master(m)
    H.finish()
  end)

  it("worker-destroy (Node test-cluster-worker-destroy): destroy() in a worker works while connected and after its disconnect", function()
    local rs = {}
    for _, mode in ipairs { "destroy_after_disconnect", "kill" } do
      rs[mode] = watch(cluster.fork({ FIXTURE_MODE = mode }))
    end
    assert.is_true(H.wait_until(function()
      return rs.destroy_after_disconnect.done() and rs.kill.done()
    end, 5000))
    H.run_for(20)
    for mode, r in pairs(rs) do
      assert.equal(1, r.worker_disconnect, mode)
      assert.equal(1, r.worker_exit, mode)
      assert.equal(0, r.code, mode)
      assert.is_true(r.flag_at_exit, mode)
    end
    H.finish()
  end)

  it("worker-disconnect (Node test-cluster-worker-disconnect): worker:disconnect() reaches the worker's 'disconnect' listener, sets suicide and state, and the worker dies", function()
    local w = cluster.fork({ FIXTURE_MODE = "sentinel" })
    local r = watch(w)
    w:once("online", H.expect(function() w:disconnect() end))
    assert.is_true(H.wait_until(r.done, 5000))
    assert.equal(1, r.worker_disconnect)
    assert.equal(1, r.cluster_disconnect)
    assert.equal(1, r.worker_exit)
    assert.equal(42, r.code)          -- the worker's own 'disconnect' listener chose it
    assert.equal("disconnected", r.state_at_disconnect)
    assert.is_true(r.flag_at_disconnect)
    assert.is_true(w.suicide)
    assert.is_true(r.died)
    H.finish()
  end)

  it("disconnect-exitedAfterDisconnect-race (Node test-cluster-disconnect-exitedAfterDisconnect-race): a worker's own 'disconnect' waits for the channel, and it exits 0", function()
    local w = cluster.fork({ FIXTURE_MODE = "disconnect_race" })
    local r = watch(w)
    assert.is_true(H.wait_until(r.done, 5000))
    assert.equal(0, r.code, "signal " .. tostring(r.signal))
    assert.is_true(r.flag_at_exit)
    H.finish()
  end)

  it("disconnect-with-no-workers (Node test-cluster-disconnect-with-no-workers): cluster.disconnect(cb) with no workers calls cb later, once", function()
    assert.is_nil(next(cluster.workers))
    local called = false
    cluster.disconnect(H.expect(function(...)
      assert.equal(0, select("#", ...))
      called = true
    end))
    assert.is_false(called)
    assert.is_true(H.wait_until(function() return called end, 2000))
    H.run_for(20)
    cluster.disconnect()   -- no callback is fine too
    H.run_for(10)
    H.finish()
  end)

  it("cluster.disconnect(cb) disconnects every worker: they exit 0 with exitedAfterDisconnect true, cb runs once after all disconnected", function()
    local rs, ws = {}, {}
    local online = 0
    for i = 1, 3 do
      ws[i] = cluster.fork()
      rs[i] = watch(ws[i])
      ws[i]:on("online", function() online = online + 1 end)
    end
    assert.is_true(H.wait_until(function() return online == 3 end, 5000))
    local at_cb
    cluster.disconnect(H.expect(function()
      at_cb = {}
      for i = 1, 3 do at_cb[i] = ws[i]:isConnected() end
    end))
    assert.is_nil(next(cluster.workers))
    assert.is_nil(at_cb)
    assert.is_true(H.wait_until(function()
      return at_cb and rs[1].done() and rs[2].done() and rs[3].done()
    end, 5000))
    for i = 1, 3 do
      assert.is_false(at_cb[i])
      assert.equal(0, rs[i].code)
      assert.is_true(rs[i].flag_at_disconnect)
      assert.is_true(rs[i].flag_at_exit)
    end
    H.finish()
  end)

  it("worker:disconnect() right after fork, before 'online', still ends the worker with code 0 and exitedAfterDisconnect true", function()
    local w = cluster.fork()
    local r = watch(w)
    w:disconnect()
    assert.is_nil(cluster.workers[w.id])
    assert.is_true(H.wait_until(r.done, 5000))
    assert.equal(0, r.code)
    assert.is_true(r.flag_at_exit)
    assert.equal(1, r.worker_disconnect)
    assert.equal(1, r.worker_exit)
    H.finish()
  end)

  it("a worker's own child processes do not hold its channel: 'disconnect' follows its exit while the child lives on", function()
    local w = cluster.fork({ FIXTURE_MODE = "grandchild" })
    local r = watch(w)
    local grandchild
    w:on("message", function(m) grandchild = H.track(m.grandchild) end)
    assert.is_true(H.wait_until(function() return r.worker_exit == 1 end, 5000))
    assert.is_not_nil(grandchild)
    assert.is_true(H.wait_until(r.done, 1000), "no 'disconnect' while the worker's child holds the channel")
    assert.is_true(H.alive(grandchild))
    assert.is_nil(cluster.workers[w.id])
    H.finish()
  end)

  it("a worker's own child processes do not inherit its channel descriptor", function()
    local w = cluster.fork({ FIXTURE_MODE = "grandchild" })
    local grandchild
    w:on("message", function(m) grandchild = H.track(m.grandchild) end)
    assert.is_true(H.wait_until(function() return grandchild ~= nil end, 5000))
    local p = io.popen("ls -l /proc/" .. grandchild .. "/fd 2>/dev/null")
    local fds = p:read("a")
    p:close()
    assert.truthy(fds:find("null", 1, true), fds)   -- the listing worked
    assert.falsy(fds:find("socket:", 1, true), "the worker's child holds a socket:\n" .. fds)
    H.finish()
  end)

  it("state goes online > disconnected > dead for a worker that exits on its own", function()
    local w = cluster.fork({ FIXTURE_MODE = "exit", FIXTURE_CODE = "0" })
    local states = {}
    w:on("online", function() states[#states + 1] = w.state end)
    w:on("disconnect", function() states[#states + 1] = "d:" .. w.state end)
    w:on("exit", function() states[#states + 1] = "e:" .. w.state end)
    assert.is_true(H.wait_until(function() return #states == 3 end, 5000))
    assert.equal("online", states[1])
    -- each event sees the state it set
    for i = 2, 3 do
      local kind, st = states[i]:match("^(%a):(%a+)$")
      assert.equal(kind == "d" and "disconnected" or "dead", st)
    end
    H.finish()
  end)
end)
