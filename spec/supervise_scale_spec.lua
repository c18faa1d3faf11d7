-- Scale: cluster.scale(n) forks or gracefully stops workers (the newest first); in a
-- supervising master SIGTTIN adds one and SIGTTOU removes one.
local cluster = require "cluster"
local core = require "cluster.core"
local H = require "helper"
local R = require "fixtures.sup_lib"

local function live_ids()
  local ids = {}
  for id in pairs(cluster.workers) do ids[#ids + 1] = id end
  table.sort(ids)
  return ids
end

describe("supervise: cluster.scale(n)", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {} }
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    H.teardown()
  end)

  it("forks up to n and stops the newest down to n, gracefully and without respawn", function()
    local rec = R.record(cluster)
    cluster.supervise {
      workers = 2, readiness = "explicit", env = { SUP_MODE = "ready" },
      grace = 500, killTimeout = 500, signals = false, output = false,
    }
    assert.is_true(H.wait_until(rec.has("ready", 2), 5000), rec.dump())
    local first = live_ids()
    cluster.scale(4)
    assert.is_true(H.wait_until(rec.has("ready", 4), 5000), rec.dump())
    assert.equal(1, rec.count("scale", { n = 4 }))
    assert.equal(4, #live_ids())
    cluster.scale(1)
    assert.is_true(H.wait_until(rec.has("exit", 3), 5000), rec.dump())
    H.run_for(200)
    assert.equal(1, rec.count("scale", { n = 1 }))
    -- the oldest stays; the three others disconnected and exited 0
    assert.same({ first[1] }, live_ids())
    assert.equal(3, rec.count("exit", { code = 0 }))
    assert.equal(0, rec.count("stopped"))
    assert.equal(0, rec.count("respawn"))
    -- scale(0) is allowed; scale with a bad n raises
    assert.has_error(function() cluster.scale(-1) end)
    assert.has_error(function() cluster.scale(1.5) end)
    assert.has_error(function() cluster.scale("2") end)
    local done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    -- no supervisor running: scale raises
    assert.has_error(function() cluster.scale(2) end)
    H.finish()
  end)

  it("scaling down cancels a respawn not yet due before stopping a live worker", function()
    local rec = R.record(cluster)
    cluster.supervise {
      workers = 2, readiness = "explicit", env = { SUP_MODE = "ready" },
      backoff = { initial = 300, factor = 2, max = 1000, reset = 60000 },
      grace = 500, killTimeout = 500, signals = false, output = false,
    }
    assert.is_true(H.wait_until(rec.has("ready", 2), 5000), rec.dump())
    local ids = live_ids()
    cluster.workers[ids[2]]:kill("SIGKILL")
    assert.is_true(H.wait_until(rec.has("exit", 1), 3000), rec.dump())
    -- the respawn is due in 300 ms: scale(1) cancels it, the live worker stays
    cluster.scale(1)
    H.run_for(600)
    assert.equal(0, rec.count("respawn"), rec.dump())
    assert.same({ ids[1] }, live_ids())
    assert.equal(1, rec.count("exit"))
    local done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    H.finish()
  end)
end)

describe("supervise: cluster.scale(n) while a failed start is being stopped", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {} }
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    H.teardown()
  end)

  it("counts it (it is to be respawned): scale to the same n forks nothing more", function()
    local control = H.tmpname("control")
    -- the first worker misses readyTimeout and, ignoring SIGTERM, takes a while to go
    R.write(control, "late")
    local rec = R.record(cluster)
    cluster.supervise {
      workers = 1, readiness = "explicit", readyTimeout = 300, killTimeout = 1500,
      env = { SUP_CONTROL = control }, backoff = { initial = 10, factor = 1, max = 10, reset = 60000 },
      signals = false, output = false,
    }
    assert.is_true(H.wait_until(rec.has("readyTimeout"), 3000), rec.dump())
    R.write(control, "ready")
    cluster.scale(1)
    assert.is_true(H.wait_until(rec.has("respawn"), 5000), rec.dump())
    assert.is_true(H.wait_until(rec.has("ready"), 3000), rec.dump())
    H.run_for(200)
    assert.equal(1, #live_ids(), rec.dump())
    assert.equal(2, rec.count("fork"), rec.dump())
    local done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    os.remove(control)
    H.finish()
  end)
end)

describe("supervise: cluster.scale(n) while workers are being replaced", function()
  local port
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {} }
    port = R.free_port()
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    H.teardown()
  end)

  -- Two workers that get ready (listening) 300 ms after they start; a reload under way.
  local function reloading()
    local rec = R.record(cluster)
    cluster.supervise {
      workers = 2, env = { SUP_MODE = "serve", SUP_PORT = tostring(port), SUP_DELAY = "300" },
      grace = 500, killTimeout = 500, signals = false, output = false,
    }
    assert.is_true(H.wait_until(rec.has("ready", 2), 5000), rec.dump())
    local result = {}
    assert.is_true(cluster.reload(function(err) result.err, result.done = err, true end))
    return rec, result
  end

  local function settled(rec, result, n)
    assert.is_true(H.wait_until(function() return result.done end, 5000), rec.dump())
    H.run_for(700) -- (a worker forked by mistake would be ready by then)
    assert.is_nil(result.err, rec.dump())
    assert.equal(0, rec.count("reloadFailed"), rec.dump())
    assert.equal(n, #live_ids(), rec.dump())
  end

  it("scaling down during a reload stops old workers, and the reload goes on", function()
    local rec, result = reloading()
    cluster.scale(1)
    settled(rec, result, 1)
    -- the one left is of the new generation
    assert.equal(1, rec.count("reload", { phase = "replaced", new = live_ids()[1] }), rec.dump())
    local done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    H.finish()
  end)

  it("scaling to 0 during a reload also stops a new worker still starting, and the worker it was to replace", function()
    local rec, result = reloading()
    cluster.scale(0)
    settled(rec, result, 0)
    assert.equal(1, rec.count("reloaded", { replaced = 0 }), rec.dump())
    local done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    H.finish()
  end)
end)

describe("supervise: SIGTTIN and SIGTTOU", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("add and remove one worker in a supervising master", function()
    local m = R.start_master(H, [[
      return { workers = 2, readiness = "explicit", env = { SUP_MODE = "ready" }, grace = 500, killTimeout = 500 }
    ]])
    assert.is_true(H.wait_until(m.has("ready", 2), 5000), m.output())
    core.kill(m.pid, "SIGTTIN")
    assert.is_true(H.wait_until(m.has("ready", 3), 5000), m.output())
    assert.equal(1, m.count("scale", { n = 3 }), m.output())
    core.kill(m.pid, "SIGTTIN")
    assert.is_true(H.wait_until(m.has("ready", 4), 5000), m.output())
    assert.equal(1, m.count("scale", { n = 4 }), m.output())
    core.kill(m.pid, "SIGTTOU")
    assert.is_true(H.wait_until(m.has("exit", 1), 5000), m.output())
    assert.equal(2, m.count("scale", { n = 3 }), m.output())
    core.kill(m.pid, "SIGTTOU")
    assert.is_true(H.wait_until(m.has("exit", 2), 5000), m.output())
    H.run_for(200)
    assert.equal(2, m.count("scale", { n = 3 }), m.output())
    assert.equal(1, m.count("scale", { n = 2 }), m.output())
    assert.equal(2, m.count("exit", { code = 0 }), m.output())
    assert.equal(4, m.count("fork"), m.output())
    assert.equal(0, m.count("respawn"), m.output())
    -- the newest went first
    local exits = m.all("exit")
    assert.equal(4, exits[1].id)
    assert.equal(3, exits[2].id)
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(5000), m.output())
    H.cleanup_master(m)
    H.finish()
  end)
end)
