-- Stats: cluster.stats() and worker:stats() give pid, state, uptime, restarts,
-- connections handed by round-robin, RSS and CPU time, read from the real processes.
local cluster = require "cluster"
local core = require "cluster.core"
local H = require "helper"
local R = require "fixtures.sup_lib"

describe("supervise: stats", function()
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

  it("has sane fields: pids match, rss > 0, uptime grows, connections count RR hand-offs, restarts count respawns", function()
    local rec = R.record(cluster)
    cluster.supervise {
      workers = 2, env = { SUP_MODE = "serve", SUP_PORT = tostring(port) },
      backoff = { initial = 10, factor = 2, max = 100, reset = 60000 },
      grace = 200, killTimeout = 200, signals = false, output = false,
    }
    assert.is_true(H.wait_until(rec.has("ready", 2), 5000), rec.dump())

    local s1 = cluster.stats()
    assert.equal(core.getpid(), s1.master.pid)
    assert.is_true(s1.master.rss > 0)
    assert.is_true(s1.master.cpu >= 0)
    assert.is_true(s1.master.uptime > 0)
    assert.equal(2, s1.count)
    assert.equal(2, #s1.workers)
    assert.equal(0, s1.restarts)
    assert.is_true(s1.workers[1].id < s1.workers[2].id)
    for _, ws in ipairs(s1.workers) do
      local w = cluster.workers[ws.id]
      assert.equal(w.process.pid, ws.pid)
      assert.is_true(H.alive(ws.pid))
      assert.equal("listening", ws.state)
      assert.is_true(ws.ready)
      assert.is_true(ws.rss > 0, "rss " .. tostring(ws.rss))
      -- about the size of a Lua interpreter, not of the machine
      assert.is_true(ws.rss < 512 * 1024 * 1024, "rss " .. tostring(ws.rss))
      assert.is_true(ws.cpu >= 0)
      assert.is_true(ws.uptime > 0)
      assert.equal(0, ws.restarts)
      assert.equal(0, ws.connections)
      -- worker:stats() gives the same record
      local own = w:stats()
      for _, k in ipairs { "id", "pid", "state", "restarts", "connections", "ready" } do
        assert.equal(ws[k], own[k], k)
      end
    end

    -- ten requests through round-robin: each worker's count is what it served
    local by_id, n = {}, 0
    local function one()
      R.http_get(port, function(err, id)
        assert.is_nil(err)
        by_id[id] = (by_id[id] or 0) + 1
        n = n + 1
        if n < 10 then one() end
      end)
    end
    one()
    assert.is_true(H.wait_until(function() return n == 10 end, 5000))
    H.run_for(200)
    local s2 = cluster.stats()
    local total = 0
    for i, ws in ipairs(s2.workers) do
      assert.equal(by_id[ws.id] or 0, ws.connections)
      total = total + ws.connections
      assert.is_true(ws.uptime > s1.workers[i].uptime + 0.15, "uptime did not grow")
    end
    assert.equal(10, total)
    assert.is_true(s2.master.uptime > s1.master.uptime)

    -- CPU time is the process's: a spinning worker accumulates it
    local spinner = cluster.workers[s2.workers[1].id]
    local cpu0 = spinner:stats().cpu
    spinner:send({ cmd = "spin" })
    assert.is_true(H.wait_until(function() return spinner:stats().cpu - cpu0 >= 0.2 end, 10000, 50),
      string.format("cpu %.2f -> %.2f", cpu0, spinner:stats().cpu))

    -- restarts count respawns: the replacement of a killed worker has 1
    spinner:kill("SIGKILL")
    assert.is_true(H.wait_until(rec.has("respawn", 1, { replaced = spinner.id }), 3000), rec.dump())
    local new = rec.all("respawn", { replaced = spinner.id })[1].id
    assert.is_true(H.wait_until(rec.has("ready", 1, { id = new }), 3000), rec.dump())
    assert.equal(1, cluster.workers[new]:stats().restarts)
    local s3 = cluster.stats()
    assert.equal(1, s3.restarts)
    assert.equal(2, s3.count)
    -- and its connection count starts from zero
    assert.equal(0, cluster.workers[new]:stats().connections)
    -- a dead worker's stats: its pid, state "dead", not ready, nothing measured
    local dead = spinner:stats()
    assert.equal(spinner.process.pid, dead.pid)
    assert.equal("dead", dead.state)
    assert.is_false(dead.ready)
    assert.equal(0, dead.rss)
    -- its uptime stopped at its exit
    H.run_for(100)
    assert.equal(dead.uptime, spinner:stats().uptime)

    local done = false
    cluster.shutdown({ grace = 200, killTimeout = 200 }, function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    H.finish()
  end)
end)
