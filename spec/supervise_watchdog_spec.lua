-- Watchdog: a worker's loop beats from C (LUACLUSTER_HEARTBEAT_MS); a worker silent for
-- longer than the timeout (stuck in `while true do end`) is reported with 'watchdog' and
-- by default killed and replaced. A worker whose loop runs is never flagged.
local cluster = require "cluster"
local H = require "helper"
local R = require "fixtures.sup_lib"

local TIMEOUT = 800

describe("supervise: watchdog", function()
  local control
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {} }
    control = H.tmpname("control")
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    os.remove(control)
    H.teardown()
  end)

  local function start(action)
    local rec = R.record(cluster)
    cluster.supervise {
      workers = 2, readiness = "explicit", env = { SUP_CONTROL = control },
      backoff = { initial = 10, factor = 2, max = 100, reset = 60000 },
      watchdog = { interval = 50, timeout = TIMEOUT, action = action },
      grace = 100, killTimeout = 100, signals = false, output = false,
    }
    assert.is_true(H.wait_until(rec.has("ready", 2), 5000), rec.dump())
    return rec
  end

  it("reports a worker stuck in `while true do end` ('watchdog') and kills and replaces it", function()
    R.write(control, "ready")
    local rec = start()
    local ids = {}
    for id in pairs(cluster.workers) do ids[#ids + 1] = id end
    table.sort(ids)
    local stuck, healthy = cluster.workers[ids[1]], cluster.workers[ids[2]]
    local stuck_at = R.now()
    stuck:send({ cmd = "spin" })
    assert.is_true(H.wait_until(rec.has("watchdog"), 5000), rec.dump())
    local e = rec.all("watchdog")[1]
    assert.equal(stuck.id, e.id)
    assert.is_true(e.ms > TIMEOUT, "reported after " .. e.ms .. " ms of silence")
    assert.is_true(R.now() - stuck_at >= TIMEOUT - 60)
    -- killed and replaced by a new worker that gets ready
    assert.is_true(H.wait_until(rec.has("respawn", 1, { replaced = stuck.id }), 3000), rec.dump())
    assert.equal("SIGKILL", rec.all("exit", { id = stuck.id })[1].signal)
    assert.is_false(H.alive(stuck.process.pid))
    local new = rec.all("respawn", { replaced = stuck.id })[1].id
    assert.is_true(H.wait_until(rec.has("ready", 1, { id = new }), 3000), rec.dump())
    -- the healthy worker and the replacement beat on: no further report
    H.run_for(TIMEOUT * 2)
    assert.equal(1, rec.count("watchdog"), rec.dump())
    assert.is_true(H.alive(healthy.process.pid))
    local done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    H.finish()
  end)

  it("reports a worker again when it gets stuck again after recovering", function()
    R.write(control, "ready")
    local calls = {}
    local rec = start(function(w, ms) calls[#calls + 1] = { id = w.id, ms = ms } end)
    local w = cluster.workers[select(1, next(cluster.workers))]
    w:send({ cmd = "stall", ms = TIMEOUT * 2 })
    assert.is_true(H.wait_until(function() return #calls >= 1 end, 5000), rec.dump())
    -- it recovers and beats again for a while, then stalls again
    H.run_for(TIMEOUT * 2)
    assert.equal(1, #calls)
    w:send({ cmd = "stall", ms = TIMEOUT * 2 })
    assert.is_true(H.wait_until(function() return #calls >= 2 end, 5000), rec.dump())
    assert.equal(w.id, calls[2].id)
    assert.equal(0, rec.count("exit"))
    local done = false
    cluster.shutdown({ grace = 100, killTimeout = 100 }, function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    H.finish()
  end)

  it("runs a function action instead of killing", function()
    R.write(control, "ready")
    local calls = {}
    local rec = start(function(w, ms) calls[#calls + 1] = { id = w.id, ms = ms } end)
    local w = cluster.workers[select(1, next(cluster.workers))]
    w:send({ cmd = "spin" })
    assert.is_true(H.wait_until(function() return #calls > 0 end, 5000), rec.dump())
    assert.equal(w.id, calls[1].id)
    assert.is_true(calls[1].ms > TIMEOUT)
    assert.equal(1, rec.count("watchdog"))
    -- not killed: the action decides
    H.run_for(200)
    assert.is_true(H.alive(w.process.pid))
    assert.equal(0, rec.count("exit"))
    local done = false
    cluster.shutdown({ grace = 0, killTimeout = 100 }, function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    H.finish()
  end)
end)

describe("supervise: watchdog, when the master itself was not running", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("does not blame the workers: a master stopped (SIGSTOP) past the timeout kills nobody when it goes on", function()
    local core = require "cluster.core"
    local m = R.start_master(H, [[
      return { workers = 2, readiness = "explicit", watchdog = { interval = 50, timeout = 300 }, grace = 100, killTimeout = 100 }
    ]])
    assert.is_true(H.wait_until(m.has("ready", 2), 5000), m.output())
    core.kill(m.pid, "SIGSTOP")
    H.run_for(800)
    core.kill(m.pid, "SIGCONT")
    -- the workers beat all along: once the master has read that, nobody is reported
    H.run_for(600)
    assert.equal(0, m.count("watchdog"), m.output())
    assert.equal(0, m.count("exit"), m.output())
    -- a worker that really is stuck is still caught
    core.kill(m.pids()[1], "SIGSTOP")
    assert.is_true(H.wait_until(m.has("watchdog"), 3000), m.output())
    assert.equal(m.pids()[1], m.all("watchdog")[1].pid)
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(5000), m.output())
    H.cleanup_master(m)
    H.finish()
  end)
end)
