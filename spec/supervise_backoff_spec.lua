-- Backoff: while workers keep failing, the restart delay grows by `factor` up to `max`;
-- once a worker has been ready and stable for `reset` ms, it starts again at `initial`.
-- Delays are measured from timestamps (a worker's 'exit' to its replacement's
-- 'respawn'); the spec checks the ordering and growth with generous bounds.
local cluster = require "cluster"
local H = require "helper"
local R = require "fixtures.sup_lib"

local INITIAL, FACTOR, MAX, RESET = 100, 2, 800, 300

local function shutdown()
  local done = false
  cluster.shutdown({ grace = 100, killTimeout = 100 }, function() done = true end)
  assert.is_true(H.wait_until(function() return done end, 3000), "shutdown did not call back")
end

describe("supervise: backoff", function()
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

  it("grows by factor up to max while workers fail, and resets once a worker is ready and stable", function()
    R.write(control, "crash")
    local exited_at, respawns = {}, {}
    cluster.on("exit", function(w) exited_at[w.id] = R.now() end)
    cluster.on("respawn", function(w, old, delay)
      respawns[#respawns + 1] = { id = w.id, old = old.id, delay = delay, waited = R.now() - exited_at[old.id] }
    end)
    local rec = R.record(cluster)
    cluster.supervise {
      workers = 1, restart = "permanent", readiness = "explicit", readyTimeout = 5000,
      env = { SUP_CONTROL = control },
      backoff = { initial = INITIAL, factor = FACTOR, max = MAX, reset = RESET },
      intensity = 100, period = 60, grace = 100, killTimeout = 100, signals = false, output = false,
    }

    -- five failed starts in a row: 100, 200, 400, 800 (the cap), 800
    assert.is_true(H.wait_until(function() return #respawns >= 5 end, 10000), rec.dump())
    local want = { 100, 200, 400, 800, 800 }
    for i = 1, 5 do
      assert.equal(want[i], respawns[i].delay, "reported delay #" .. i)
      assert.is_true(respawns[i].waited >= want[i] - 25,
        string.format("respawn #%d after %.0f ms, before its delay %d", i, respawns[i].waited, want[i]))
      assert.is_true(respawns[i].waited < want[i] + 2000,
        string.format("respawn #%d after %.0f ms, far beyond its delay %d", i, respawns[i].waited, want[i]))
    end
    -- each waited at least its delay (timers never fire early), so the measured waits
    -- grow with the reported ones; the capped wait is well beyond the first
    assert.is_true(respawns[4].waited > respawns[1].waited,
      string.format("measured delays do not grow: #1 %.0f ms, #4 %.0f ms", respawns[1].waited, respawns[4].waited))

    -- the next generation gets ready; one that fails before it was stable for `reset`
    -- ms forgives nothing: still the cap
    R.write(control, "ready")
    assert.is_true(H.wait_until(rec.has("ready", 1), 3000), rec.dump())
    local function respawn_of(old)
      for _, r in ipairs(respawns) do if r.old == old then return r end end
    end
    local first = rec.all("ready")[1].id
    cluster.workers[first]:send({ cmd = "exit", code = 1 })
    assert.is_true(H.wait_until(function() return respawn_of(first) end, 3000), rec.dump())
    assert.equal(MAX, respawn_of(first).delay, "a crash before the worker was stable reset the backoff")

    -- this one stays ready longer than `reset`: the next failure starts over at `initial`
    local second = respawn_of(first).id
    assert.is_true(H.wait_until(rec.has("ready", 1, { id = second }), 3000), rec.dump())
    H.run_for(RESET + 200)
    cluster.workers[second]:send({ cmd = "exit", code = 1 })
    assert.is_true(H.wait_until(function() return respawn_of(second) end, 3000), rec.dump())
    local after = respawn_of(second)
    assert.equal(INITIAL, after.delay, "the backoff did not reset after a stable worker")
    assert.is_true(after.waited >= INITIAL - 25)
    assert.is_true(after.waited < respawn_of(first).waited,
      string.format("after the reset the delay did not shrink: %.0f ms then %.0f ms", respawn_of(first).waited, after.waited))
    shutdown()
    H.finish()
  end)
end)
