-- Graceful stop with escalation: disconnect, then SIGTERM after `grace`, then SIGKILL
-- after `killTimeout`; cluster.shutdown([opts][, cb]) does it for every worker; a
-- supervising master that gets SIGTERM or SIGINT shuts down that way and exits with
-- shutdownExitCode (0 by default).
local cluster = require "cluster"
local core = require "cluster.core"
local H = require "helper"
local R = require "fixtures.sup_lib"

local GRACE, KILL = 200, 200

local function options(extra)
  local o = {
    workers = 1, restart = "permanent", readiness = "explicit", readyTimeout = 5000,
    backoff = { initial = 10, factor = 2, max = 100, reset = 60000 },
    intensity = 100, period = 10, grace = GRACE, killTimeout = KILL, signals = false, output = false,
  }
  for k, v in pairs(extra) do o[k] = v end
  return o
end

local function only_worker()
  local w = next(cluster.workers) and select(2, next(cluster.workers))
  assert.truthy(w)
  return w
end

describe("supervise: graceful stop", function()
  local control
  before_each(function()
    H.setup()
    -- silent: the stubborn worker's "ignoring SIGTERM" comes back as 'output'
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {}, silent = true }
    control = H.tmpname("control")
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    os.remove(control)
    H.teardown()
    cluster.setupMaster { silent = false }
  end)

  it("escalates on a worker that ignores disconnect and SIGTERM: 'stopped' SIGTERM after grace, then SIGKILL", function()
    local rec = R.record(cluster)
    local lines = {}
    cluster.on("output", function(w, stream, line) lines[#lines + 1] = stream .. ": " .. line end)
    cluster.supervise(options { env = { SUP_MODE = "stubborn" } })
    assert.is_true(H.wait_until(rec.has("ready"), 5000), rec.dump())
    local w = only_worker()
    local done = H.expect(function(dw) assert.equal(w, dw) end, 1)
    local t0 = R.now() - rec.t0
    cluster.stopWorker(w, nil, done)
    assert.is_true(H.wait_until(rec.has("exit", 1, { id = w.id }), 3000), rec.dump())
    H.run_for(100)
    local function at(name, where)
      local e = rec.all(name, where)[1]
      assert.truthy(e, name .. " missing\n" .. rec.dump())
      return e.t - t0
    end
    -- in order: disconnected at once, SIGTERM after grace, SIGKILL killTimeout later
    local d, term, kill, exit = at("disconnect", { id = w.id }), at("stopped", { how = "SIGTERM" }),
      at("stopped", { how = "SIGKILL" }), at("exit", { id = w.id })
    assert.is_true(d < term, rec.dump())
    assert.is_true(term >= GRACE - 25, rec.dump())
    assert.is_true(kill >= term + KILL - 25, rec.dump())
    assert.is_true(exit >= kill, rec.dump())
    assert.equal("SIGKILL", rec.all("exit", { id = w.id })[1].signal)
    assert.is_nil(rec.all("exit", { id = w.id })[1].code)
    assert.equal(2, rec.count("stopped"))
    -- the worker got SIGTERM and its cluster.on("SIGTERM") handler ignored it
    assert.truthy(table.concat(lines, "\n"):find("stderr: stubborn: ignoring SIGTERM", 1, true), table.concat(lines, "\n"))
    -- a stopped worker is not respawned
    assert.equal(0, rec.count("respawn"))
    assert.is_false(H.alive(w.process.pid))
    cluster.shutdown()
    H.finish()
  end)

  it("a worker that obeys disconnect exits 0 before any escalation", function()
    local rec = R.record(cluster)
    cluster.supervise(options { env = { SUP_MODE = "ready" } })
    assert.is_true(H.wait_until(rec.has("ready"), 5000), rec.dump())
    local w = only_worker()
    local done = H.expect(nil, 1)
    cluster.stopWorker(w, nil, done)
    assert.is_true(H.wait_until(rec.has("exit", 1, { id = w.id }), 3000), rec.dump())
    H.run_for(GRACE + KILL + 50)
    assert.equal(0, rec.all("exit", { id = w.id })[1].code)
    assert.equal(0, rec.count("stopped"))
    assert.equal(0, rec.count("respawn"))
    cluster.shutdown()
    H.finish()
  end)

  it("shutdown(cb) stops every worker, escalating only where needed, then calls back with none left", function()
    R.write(control, "ready")
    local rec = R.record(cluster)
    cluster.supervise(options { workers = 2, env = { SUP_CONTROL = control } })
    assert.is_true(H.wait_until(rec.has("ready", 2), 5000), rec.dump())
    R.write(control, "stubborn")
    cluster.scale(3)
    assert.is_true(H.wait_until(rec.has("ready", 3), 5000), rec.dump())
    local stubborn = rec.all("ready")[3].id
    local pids = {}
    for _, w in pairs(cluster.workers) do pids[#pids + 1] = w.process.pid end
    local called, workers_left = 0, nil
    cluster.shutdown(function()
      called = called + 1
      workers_left = next(cluster.workers)
      for _, pid in ipairs(pids) do assert.is_false(H.alive(pid)) end
    end)
    assert.is_true(H.wait_until(function() return called > 0 end, 3000), rec.dump())
    H.run_for(100)
    assert.equal(1, called)
    assert.is_nil(workers_left)
    assert.equal(1, rec.count("shutdown"))
    -- two obeyed the disconnect; the stubborn one needed SIGTERM then SIGKILL
    assert.equal(2, rec.count("exit", { code = 0 }), rec.dump())
    assert.equal(1, rec.count("exit", { id = stubborn, signal = "SIGKILL" }), rec.dump())
    assert.equal(2, rec.count("stopped", { id = stubborn }))
    assert.equal(2, rec.count("stopped"))
    assert.equal(0, rec.count("respawn"))
    H.finish()
  end)

  it("shutdown(cb) with no worker left calls back asynchronously", function()
    local rec = R.record(cluster)
    cluster.supervise(options { workers = 0 })
    local called = false
    cluster.shutdown({ grace = 0 }, function() called = true end)
    assert.is_false(called)
    assert.is_true(H.wait_until(function() return called end, 1000))
    assert.equal(1, rec.count("shutdown"))
    H.finish()
  end)
end)

describe("supervise: a master that gets SIGTERM or SIGINT", function()
  before_each(H.setup)
  after_each(H.teardown)

  local function serving_master(extra)
    local m = R.start_master(H, [[
      return { workers = 2, env = { SUP_MODE = "serve", SUP_PORT = "0" },
        grace = 2000, killTimeout = 2000, ]] .. (extra or "") .. [[ }
    ]])
    assert.is_true(H.wait_until(m.has("ready", 2), 5000), m.output())
    return m
  end

  local function all_gone(pids)
    return function()
      for _, pid in ipairs(pids) do if H.alive(pid) then return false end end
      return true
    end
  end

  it("SIGTERM: shuts down gracefully (workers disconnect and exit 0) and exits 0, leaving no worker", function()
    local m = serving_master()
    local pids = m.pids()
    assert.equal(2, #pids)
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(5000), m.output())
    assert.equal(1, m.count("shutdown"), m.output())
    -- graceful: each worker disconnected and exited 0, nothing was signalled
    assert.equal(2, m.count("disconnect"), m.output())
    assert.equal(2, m.count("exit", { code = 0 }), m.output())
    assert.equal(0, m.count("stopped"), m.output())
    assert.equal(0, m.count("respawn"), m.output())
    assert.is_true(H.wait_until(all_gone(pids), 1000))
    H.cleanup_master(m)
    H.finish()
  end)

  it("SIGHUP, SIGTTIN and SIGTTOU during the shutdown are ignored: the shutdown completes and the master exits 0", function()
    local m = R.start_master(H, [[
      return { workers = 1, readiness = "explicit", env = { SUP_MODE = "stubborn" }, grace = 300, killTimeout = 300 }
    ]])
    assert.is_true(H.wait_until(m.has("ready", 1), 5000), m.output())
    local pids = m.pids()
    core.kill(m.pid, "SIGTERM")
    assert.is_true(H.wait_until(m.has("shutdown"), 3000), m.output())
    -- the stubborn worker keeps the shutdown going (it ignores disconnect and SIGTERM)
    for _, sig in ipairs { "SIGHUP", "SIGTTIN", "SIGTTOU" } do
      core.kill(m.pid, sig)
      H.run_for(50)
    end
    assert.equal(0, m.wait_exit(5000), m.output())
    assert.equal(0, m.count("reload") + m.count("scale"), m.output())
    assert.equal(1, m.count("fork"), m.output())
    assert.equal(1, m.count("stopped", { how = "SIGKILL" }), m.output())
    assert.is_true(H.wait_until(all_gone(pids), 1000))
    H.cleanup_master(m)
    H.finish()
  end)

  it("the same signal again during the shutdown (an impatient Ctrl-C) kills the workers left and exits at once", function()
    for _, sig in ipairs { "SIGINT", "SIGTERM" } do
      local m = R.start_master(H, [[
        return { workers = 2, readiness = "explicit", env = { SUP_MODE = "stubborn" },
                 grace = 60000, killTimeout = 60000, shutdownExitCode = 4 }
      ]])
      assert.is_true(H.wait_until(m.has("ready", 2), 5000), m.output())
      local pids = m.pids()
      core.kill(m.pid, sig)
      assert.is_true(H.wait_until(m.has("shutdown"), 3000), m.output())
      H.run_for(100)
      assert.is_true(H.alive(m.pid), "the graceful shutdown ended early")
      core.kill(m.pid, sig)
      -- at once: the stubborn workers would hold a graceful stop for two minutes
      assert.equal(4, m.wait_exit(3000), m.output())
      assert.is_true(H.wait_until(all_gone(pids), 2000), "a worker outlived the forced stop")
      H.cleanup_master(m)
    end
    H.finish()
  end)

  it("SIGINT does the same and exits with shutdownExitCode", function()
    local m = serving_master("shutdownExitCode = 3,")
    local pids = m.pids()
    core.kill(m.pid, "SIGINT")
    assert.equal(3, m.wait_exit(5000), m.output())
    assert.equal(2, m.count("exit", { code = 0 }), m.output())
    assert.is_true(H.wait_until(all_gone(pids), 1000))
    H.cleanup_master(m)
    H.finish()
  end)
end)
