-- Recycling: a worker is replaced through the graceful path (a new one first, then the
-- old one disconnects and drains) after N handled connections, after a max age, or when
-- its RSS passes a limit; 'recycle'(worker, reason) says why. Clients see no failure.
local cluster = require "cluster"
local H = require "helper"
local R = require "fixtures.sup_lib"

describe("supervise: recycling", function()
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

  local function start(workers, recycle, control)
    local rec = R.record(cluster)
    cluster.supervise {
      workers = workers, env = { SUP_MODE = "serve", SUP_PORT = tostring(port), SUP_CONTROL = control },
      backoff = { initial = 10, factor = 2, max = 100, reset = 60000 },
      recycle = recycle, grace = 1000, killTimeout = 500, signals = false, output = false,
    }
    assert.is_true(H.wait_until(rec.has("ready", workers), 5000), rec.dump())
    return rec
  end

  local function shutdown()
    local done = false
    cluster.shutdown({ grace = 500, killTimeout = 200 }, function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
  end

  -- The replacement of recycled worker `old`, or nil: recycling forks at once after
  -- 'recycle' (the 'fork' event comes later, in order), so the n-th recycle's
  -- replacement is the n-th fork after the first recycle.
  local function replacement_of(rec, old)
    local recycles, forks, started = {}, {}, false
    for _, e in ipairs(rec.events) do
      if e.name == "recycle" then
        started = true
        recycles[#recycles + 1] = e.id
      elseif started and e.name == "fork" then
        forks[#forks + 1] = e.id
      end
    end
    for i, id in ipairs(recycles) do
      if id == old then return forks[i] end
    end
  end

  -- Checks that `old` was replaced gracefully: the replacement got ready before the old
  -- one disconnected, and the old one exited 0.
  -- The replacement of `old` once its 'fork' has come (a turn after 'recycle').
  local function await_replacement(rec, old)
    H.wait_until(function() return replacement_of(rec, old) ~= nil end, 3000)
    return replacement_of(rec, old)
  end

  local function check_graceful(rec, old)
    local new = await_replacement(rec, old)
    assert.truthy(new, "no replacement for " .. old .. "\n" .. rec.dump())
    assert.is_true(H.wait_until(rec.has("exit", 1, { id = old }), 5000), rec.dump())
    local ready, gone
    for i, e in ipairs(rec.events) do
      if e.name == "ready" and e.id == new then ready = i end
      if e.name == "disconnect" and e.id == old then gone = i end
    end
    assert.truthy(ready and gone and ready < gone, rec.dump())
    assert.equal(1, rec.count("exit", { id = old, code = 0 }), rec.dump())
    return new
  end

  it("by connection count: after maxConnections handled connections, reason \"connections\"", function()
    local rec = start(1, { maxConnections = 5, jitter = 0, jitterMs = 0, check = 50 })
    local first = select(1, next(cluster.workers))
    -- five sequential requests through round-robin reach the only worker
    local served = 0
    local function one()
      R.http_get(port, function(err, id)
        assert.is_nil(err)
        assert.equal(first, id)
        served = served + 1
        if served < 5 then one() end
      end)
    end
    one()
    assert.is_true(H.wait_until(function() return served == 5 end, 5000))
    -- the count follows the worker's answers to the master, which come in small batches
    -- (at most 1 ms late)
    assert.is_true(H.wait_until(function() return cluster.workers[first]:stats().connections == 5 end, 1000))
    assert.is_true(H.wait_until(rec.has("recycle"), 3000), rec.dump())
    local e = rec.all("recycle")[1]
    assert.equal(first, e.id)
    assert.equal("connections", e.reason)
    local new = check_graceful(rec, first)
    -- the replacement serves, from a fresh count
    local id
    R.http_get(port, function(err, got) assert.is_nil(err) id = got end)
    assert.is_true(H.wait_until(function() return id ~= nil end, 3000))
    assert.equal(new, id)
    assert.is_true(H.wait_until(function() return cluster.workers[new]:stats().connections == 1 end, 1000))
    assert.equal(0, rec.count("respawn"))
    shutdown()
    H.finish()
  end)

  it("by connection count under load: no failed request while workers are recycled", function()
    local rec = start(2, { maxConnections = 40, jitter = 0.2, jitterMs = 50, check = 50 })
    local load = R.load(port, 4)
    assert.is_true(H.wait_until(rec.has("recycle", 3), 10000), rec.dump())
    load.stop()
    assert.is_true(H.wait_until(load.idle, 5000))
    assert.equal(0, load.failed, table.concat(load.failures, "\n"))
    for _, e in ipairs(rec.all("recycle")) do assert.equal("connections", e.reason) end
    shutdown()
    H.finish()
  end)

  it("by age: after maxAge ms, reason \"age\"", function()
    local age = {}
    cluster.on("recycle", function(w) age[w.id] = w:stats().uptime * 1000 end)
    local rec = start(2, { maxAge = 400, jitter = 0, jitterMs = 0, check = 50 })
    assert.is_true(H.wait_until(rec.has("recycle", 2), 3000), rec.dump())
    for _, e in ipairs(rec.all("recycle")) do
      assert.equal("age", e.reason)
      assert.is_true(age[e.id] >= 400, "recycled after " .. age[e.id] .. " ms")
    end
    local olds = rec.all("recycle")
    check_graceful(rec, olds[1].id)
    check_graceful(rec, olds[2].id)
    assert.equal(0, rec.count("respawn"))
    shutdown()
    H.finish()
  end)

  it("a replacement that fails to start leaves the old worker in place, supervised, and retried later", function()
    local control = H.tmpname("control")
    R.write(control, "serve")
    local rec = start(1, { maxAge = 300, jitter = 0, jitterMs = 0, check = 50 }, control)
    local old = select(1, next(cluster.workers))
    R.write(control, "crash")
    assert.is_true(H.wait_until(rec.has("recycle", 1, { id = old }), 3000), rec.dump())
    local failed = await_replacement(rec, old)
    assert.truthy(failed, rec.dump())
    assert.is_true(H.wait_until(rec.has("exit", 1, { id = failed }), 3000), rec.dump())
    H.run_for(150)
    -- the failed replacement is not respawned on its own; the old worker still serves
    assert.equal(0, rec.count("respawn"), rec.dump())
    assert.equal(0, rec.count("disconnect", { id = old }))
    local n = 0
    for _ in pairs(cluster.workers) do n = n + 1 end
    assert.is_true(n <= 2, rec.dump())
    local id
    R.http_get(port, function(err, got) assert.is_nil(err) id = got end)
    assert.is_true(H.wait_until(function() return id ~= nil end, 3000))
    assert.equal(old, id)
    -- once replacements start again, the old worker is recycled after all
    R.write(control, "serve")
    assert.is_true(H.wait_until(function()
      return rec.count("exit", { id = old, code = 0 }) == 1
    end, 5000), rec.dump())
    local live = {}
    for wid in pairs(cluster.workers) do live[#live + 1] = wid end
    assert.equal(1, #live, rec.dump())
    -- and a crash of the survivor is respawned as usual
    cluster.workers[live[1]]:kill("SIGKILL")
    assert.is_true(H.wait_until(rec.has("respawn", 1, { replaced = live[1] }), 3000), rec.dump())
    shutdown()
    os.remove(control)
    H.finish()
  end)

  local function live_count()
    local n = 0
    for _ in pairs(cluster.workers) do n = n + 1 end
    return n
  end

  it("a worker waiting out its recycle's jitter still counts: scale(n) and reload() keep n workers", function()
    -- past maxAge at once, and the recycle's random wait is far beyond the spec
    local rec = start(2, { maxAge = 50, jitter = 0, jitterMs = 1e9, check = 20 })
    H.run_for(300)
    assert.equal(0, rec.count("recycle"), rec.dump())
    cluster.scale(3)
    assert.is_true(H.wait_until(rec.has("ready", 3), 3000), rec.dump())
    H.run_for(300)
    assert.equal(3, live_count(), rec.dump())
    local done, failure = false, nil
    cluster.reload(function(err) done, failure = true, err end)
    assert.is_true(H.wait_until(function() return done end, 5000), rec.dump())
    H.run_for(300)
    assert.is_nil(failure, rec.dump())
    assert.equal(1, rec.count("reloaded", { replaced = 3, workers = 3 }), rec.dump())
    assert.equal(3, live_count(), rec.dump())
    shutdown()
    H.finish()
  end)

  it("a reload leaves a worker that a recycle is replacing to that recycle: no worker is replaced twice", function()
    local rec = start(2)
    local ids = {}
    for id in pairs(cluster.workers) do ids[#ids + 1] = id end
    table.sort(ids)
    local done, failure = false, nil
    cluster.reload(function(err) done, failure = true, err end)
    -- what a recycle does, on the worker the reload would replace second
    cluster.replaceWorker(cluster.workers[ids[2]], "test")
    assert.is_true(H.wait_until(function() return done end, 5000), rec.dump())
    assert.is_true(H.wait_until(rec.has("exit", 1, { id = ids[2] }), 3000), rec.dump())
    H.run_for(300)
    assert.is_nil(failure, rec.dump())
    assert.equal(2, live_count(), rec.dump())
    assert.equal(0, rec.count("reload", { phase = "replaced", old = ids[2] }), rec.dump())
    shutdown()
    H.finish()
  end)

  it("by RSS: past maxRss, reason \"rss\"", function()
    local rec = start(1, { maxRss = 1024, jitter = 0, jitterMs = 0, check = 50 })
    assert.is_true(H.wait_until(rec.has("recycle"), 3000), rec.dump())
    local e = rec.all("recycle")[1]
    assert.equal("rss", e.reason)
    check_graceful(rec, e.id)
    shutdown()
    H.finish()
  end)
end)
