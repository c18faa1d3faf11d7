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
