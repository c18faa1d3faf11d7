-- cluster.supervise{...} refuses misuse with an error naming the option, before it
-- forks anything; one supervisor at a time; functions that need one say so.
local cluster = require "cluster"
local H = require "helper"

describe("supervise: options", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {} }
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    H.teardown()
  end)

  local function refuses(options, pattern)
    local ok, err = pcall(function() cluster.supervise(options) end)
    assert.is_false(ok, "accepted " .. pattern)
    assert.truthy(tostring(err):find("supervise", 1, true), tostring(err))
    assert.truthy(tostring(err):find(pattern, 1, true), tostring(err))
    -- raised at the caller's line, not inside the module
    assert.truthy(tostring(err):find("supervise_options_spec.lua", 1, true), tostring(err))
  end

  it("raises on bad options, naming them, and forks nothing", function()
    refuses("x", "options")
    refuses({ workers = -1 }, "workers")
    refuses({ workers = 1.5 }, "workers")
    refuses({ restart = "sometimes" }, "restart")
    refuses({ readiness = "soon" }, "readiness")
    refuses({ grace = -1 }, "grace")
    refuses({ readyTimeout = "1s" }, "readyTimeout")
    refuses({ onCrashLoop = "hold" }, "onCrashLoop")
    refuses({ env = "A=1" }, "env")
    refuses({ backoff = 100 }, "backoff")
    refuses({ backoff = { factor = 0.5 } }, "backoff.factor")
    refuses({ backoff = { initial = "fast" } }, "backoff.initial")
    refuses({ watchdog = 5000 }, "watchdog")
    refuses({ recycle = true }, "recycle")
    refuses({ output = "stdout" }, "output")
    refuses({ shutdownExitCode = "0" }, "shutdownExitCode")
    refuses({ restrat = "temporary" }, "unknown option 'restrat'")
    -- nested and non-finite values are checked before anything starts too
    refuses({ readyTimeout = 1 / 0 }, "readyTimeout")
    refuses({ intensity = 0 / 0 }, "intensity")
    refuses({ backoff = { max = 1 / 0 } }, "backoff.max")
    refuses({ watchdog = { interval = "fast" } }, "watchdog.interval")
    refuses({ watchdog = { timeout = -1 } }, "watchdog.timeout")
    refuses({ watchdog = { action = "reboot" } }, "watchdog.action")
    refuses({ recycle = { check = "x" } }, "recycle.check")
    refuses({ recycle = { maxRss = "1G" } }, "recycle.maxRss")
    refuses({ env = { A = {} } }, "env.A")
    refuses({ env = { ["A=B"] = "x" } }, "env")
    refuses({ reload = { concurrency = 0 } }, "reload.concurrency")
    refuses({ reload = { concurrency = "2" } }, "reload.concurrency")
    refuses({ watchdog = { interval = 0 } }, "watchdog.interval")
    refuses({ recycle = { check = 0 } }, "recycle.check")
    assert.is_nil(next(cluster.workers))
    -- and none of the refused calls left a supervisor behind
    assert.is_nil(cluster.supervisor())
    -- what the README documents is accepted: "report", no crash-loop limit, 2.0 workers at a time
    for _, fine in ipairs { { watchdog = { action = "report" } }, { intensity = math.huge },
                            { reload = { concurrency = 2.0 } } } do
      fine.workers, fine.signals, fine.output = 0, false, false
      cluster.supervise(fine)
      local done = false
      cluster.shutdown(function() done = true end)
      assert.is_true(H.wait_until(function() return done end, 2000))
    end
    local o = cluster.supervise { workers = 0, signals = false, output = false }
    assert.equal(o, cluster.supervisor())
    H.finish()
  end)

  it("reload refuses a concurrency that could replace nothing, and a later reload still runs", function()
    cluster.supervise { workers = 0, signals = false, output = false }
    for _, bad in ipairs { 0, -1, 1.5, "2" } do
      local ok, err = pcall(function() cluster.reload({ concurrency = bad }) end)
      assert.is_false(ok)
      assert.matches("^spec/supervise_options_spec.lua:%d+: reload: bad option 'concurrency'", tostring(err))
    end
    local done
    assert.is_true(cluster.reload(function(err) done = err or true end))
    assert.is_true(H.wait_until(function() return done ~= nil end, 2000))
    assert.is_true(done)
    H.finish()
  end)

  it("shutdown and reload refuse bad options before they change anything", function()
    cluster.supervise { workers = 1, readiness = "explicit", signals = false, output = false }
    local cases = {
      { cluster.shutdown, { grace = "x" }, "shutdown: bad option 'grace'" },
      { cluster.shutdown, { grace = -5 }, "shutdown: bad option 'grace'" },
      { cluster.shutdown, { killTimeout = {} }, "shutdown: bad option 'killTimeout'" },
      { cluster.shutdown, { killTimeout = 0 / 0 }, "shutdown: bad option 'killTimeout'" },
      { cluster.shutdown, { grcae = 0 }, "shutdown: unknown option 'grcae'" },
      { cluster.shutdown, "soon", "shutdown: bad argument #1 (opts)" },
      { cluster.reload, { concurency = 2 }, "reload: unknown option 'concurency'" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(function() case[1](case[2]) end)
      assert.is_false(ok, case[3])
      assert.matches("^spec/supervise_options_spec.lua:%d+: " .. case[3]:gsub("%p", "%%%0"), tostring(err))
    end
    -- the supervisor still runs: its worker gets ready, and it reloads
    assert.is_true(H.wait_until(function() return cluster.workers[next(cluster.workers)]:stats().ready end, 3000))
    assert.equal(0, cluster.listenerCount("shutdown"))
    local done
    assert.is_true(cluster.reload(function(err) done = err or true end))
    assert.is_true(H.wait_until(function() return done ~= nil end, 3000))
    assert.is_true(done)
    done = false
    cluster.shutdown({ grace = 0, killTimeout = 100 }, function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 2000))
    H.finish()
  end)

  it("one supervisor at a time; scale and reload need one", function()
    assert.has_error(function() cluster.scale(1) end)
    assert.has_error(function() cluster.reload() end)
    cluster.supervise { workers = 0, signals = false, output = false }
    assert.has_error(function() cluster.supervise { workers = 0 } end)
    local done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 2000))
    -- after a shutdown a new one can start
    local o = cluster.supervise { workers = 0, signals = false, output = false }
    assert.equal(0, o.workers)
    assert.equal(o, cluster.supervisor())
    done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 2000))
    H.finish()
  end)
end)
