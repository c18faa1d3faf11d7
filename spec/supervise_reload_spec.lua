-- Rolling reload: cluster.reload([opts][, cb]) replaces every worker, new before old,
-- gated on the new worker's readiness, `concurrency` at a time; the old worker leaves
-- round-robin distribution before it drains. Clients run here, in the master's own loop,
-- against the workers' shared HTTP port: no request may fail during a reload. When the
-- new generation fails (crashes, or misses readiness), the reload stops, the old workers
-- stay and serve, and 'reloadFailed' says so. SIGHUP starts a reload (master subprocess).
local cluster = require "cluster"
local core = require "cluster.core"
local H = require "helper"
local R = require "fixtures.sup_lib"

local function shutdown()
  local done = false
  cluster.shutdown({ grace = 500, killTimeout = 200 }, function() done = true end)
  assert.is_true(H.wait_until(function() return done end, 3000), "shutdown did not call back")
end

local function live_ids()
  local ids = {}
  for id in pairs(cluster.workers) do ids[#ids + 1] = id end
  table.sort(ids)
  return ids
end

local function index_of(rec, name, where)
  for i, e in ipairs(rec.events) do
    local ok = e.name == name
    for k, v in pairs(where or {}) do if e[k] ~= v then ok = false end end
    if ok then return i end
  end
end

describe("supervise: rolling reload", function()
  local control, port
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {} }
    control = H.tmpname("control")
    port = R.free_port()
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    os.remove(control)
    H.teardown()
  end)

  local function start(workers, extra)
    R.write(control, "serve")
    local rec = R.record(cluster)
    local o = {
      workers = workers, restart = "permanent", readyTimeout = 3000,
      env = { SUP_CONTROL = control, SUP_PORT = tostring(port), SUP_DELAY = "100" },
      backoff = { initial = 10, factor = 2, max = 100, reset = 60000 },
      intensity = 100, period = 10, grace = 1000, killTimeout = 500, signals = false, output = false,
    }
    for k, v in pairs(extra or {}) do o[k] = v end
    cluster.supervise(o)
    assert.is_true(H.wait_until(rec.has("ready", workers), 5000), rec.dump())
    return rec
  end

  it("replaces every worker, new before old, with no failed request from sequential and concurrent clients", function()
    local rec = start(3)
    local old = live_ids()
    local old_pids = {}
    for _, id in ipairs(old) do old_pids[id] = cluster.workers[id].process.pid end
    -- one client doing requests one after another, eight doing them concurrently
    local seq, conc = R.load(port, 1), R.load(port, 8)
    H.run_for(200)
    local done_err, done_called = nil, 0
    cluster.reload(function(err) done_err, done_called = err, done_called + 1 end)
    assert.is_true(H.wait_until(function() return done_called > 0 end, 10000), rec.dump())
    -- the old ones drain and exit while the clients keep going
    assert.is_true(H.wait_until(function()
      for _, id in ipairs(old) do if rec.count("exit", { id = id }) == 0 then return false end end
      return true
    end, 5000), rec.dump())
    H.run_for(200)
    seq.stop() conc.stop()
    assert.is_true(H.wait_until(function() return seq.idle() and conc.idle() end, 5000))
    assert.is_nil(done_err)
    assert.equal(1, done_called)
    assert.equal(0, seq.failed, table.concat(seq.failures, "\n"))
    assert.equal(0, conc.failed, table.concat(conc.failures, "\n"))
    assert.is_true(seq.ok > 10 and conc.ok > 50, "too few requests to show anything: " .. seq.ok .. ", " .. conc.ok)
    assert.equal(1, rec.count("reloaded"))
    assert.equal(3, rec.all("reloaded")[1].replaced)
    assert.equal(3, rec.count("reload", { phase = "replaced" }))
    -- every worker replaced: three new ids, none of the old left; the old ones exited 0
    local new = live_ids()
    assert.equal(3, #new)
    for _, id in ipairs(new) do
      for _, o in ipairs(old) do assert.are_not.equal(o, id) end
    end
    for _, id in ipairs(old) do
      assert.equal(1, rec.count("exit", { id = id, code = 0 }), rec.dump())
      assert.is_false(H.alive(old_pids[id]))
    end
    assert.equal(0, rec.count("respawn"))
    assert.equal(0, rec.count("stopped"))
    for _, e in ipairs(rec.all("reload", { phase = "replaced" })) do
      -- new before old: the new worker was ready before the old one disconnected
      local ready, gone = index_of(rec, "ready", { id = e.new }), index_of(rec, "disconnect", { id = e.old })
      assert.truthy(ready and gone, rec.dump())
      assert.is_true(ready < gone, rec.dump())
      -- the old worker left distribution when it began draining: no request started after
      -- its 'disconnect' reached it
      local t_gone = rec.events[gone].t + rec.t0
      assert.is_nil(seq.served_after(t_gone)[e.old], "old worker " .. e.old .. " served after it left")
      assert.is_nil(conc.served_after(t_gone)[e.old], "old worker " .. e.old .. " served after it left")
    end
    -- the new generation serves
    local served = seq.served_after(R.now() - 100000)
    for _, id in ipairs(new) do
      assert.truthy(served[id] or conc.served_after(0)[id], "new worker " .. id .. " never served")
    end
    shutdown()
    H.finish()
  end)

  it("replaces `concurrency` workers at a time", function()
    local rec = start(4, { reload = { concurrency = 2 } })
    local starting, most = 0, 0
    cluster.on("fork", function() starting = starting + 1 most = math.max(most, starting) end)
    cluster.on("ready", function() starting = starting - 1 end)
    local done = false
    assert.is_true(cluster.reload(function(err) assert.is_nil(err) done = true end))
    -- one reload at a time: a second one returns false and calls back with an error
    local second
    assert.is_false(cluster.reload(function(err) second = err end))
    assert.is_true(H.wait_until(function() return second ~= nil end, 1000))
    assert.equal("ERR_RELOAD_RUNNING", second.code)
    assert.equal("reload: a reload is already running", tostring(second))
    assert.is_true(H.wait_until(function() return done end, 10000), rec.dump())
    assert.equal(2, most)
    assert.equal(4, rec.all("reloaded")[1].replaced)
    -- and reload{concurrency = 1} overrides it: one at a time
    starting, most, done = 0, 0, false
    cluster.reload({ concurrency = 1 }, function(err) assert.is_nil(err) done = true end)
    assert.is_true(H.wait_until(function() return done end, 10000), rec.dump())
    assert.equal(1, most)
    assert.equal(4, #live_ids())
    shutdown()
    H.finish()
  end)

  local function failing_generation(mode, extra, tries)
    local rec = start(2, extra)
    local old = live_ids()
    local old_pids = {}
    for _, id in ipairs(old) do old_pids[id] = cluster.workers[id].process.pid end
    R.write(control, mode)
    local err, called = nil, 0
    cluster.reload(function(e) err, called = e, called + 1 end)
    assert.is_true(H.wait_until(rec.has("reloadFailed"), 5000), rec.dump())
    -- until the new generation is gone, and a little more
    assert.is_true(H.wait_until(function()
      for _, e in ipairs(rec.all("fork")) do
        local is_old = false
        for _, id in ipairs(old) do if id == e.id then is_old = true end end
        if not is_old and rec.count("exit", { id = e.id }) == 0 then return false end
      end
      return true
    end, 5000), rec.dump())
    H.run_for(300)
    assert.equal(1, called)
    assert.truthy(err, "reload called back without an error")
    assert.equal("ERR_RELOAD_FAILED", err.code)
    assert.equal("reload", err.syscall)
    assert.equal(0, err.replaced)
    assert.equal(2, err.workers)
    assert.matches("^reload: a new worker failed readiness", tostring(err))
    local info = rec.all("reloadFailed")[1]
    assert.equal(0, info.replaced)
    assert.equal(2, info.workers)
    assert.truthy(info.reason)
    assert.equal(0, rec.count("reloaded"))
    -- the reload stopped at the first failure: one new worker tried (one per concurrent
    -- slot), not respawned
    local tried = {}
    for _, e in ipairs(rec.all("fork")) do
      local is_old = false
      for _, id in ipairs(old) do if id == e.id then is_old = true end end
      if not is_old then tried[#tried + 1] = e.id end
    end
    assert.equal(tries or 1, #tried, rec.dump())
    assert.equal(0, rec.count("respawn"), rec.dump())
    -- the old workers stay, alive and serving
    assert.same(old, live_ids())
    for _, id in ipairs(old) do
      assert.is_true(H.alive(old_pids[id]))
      assert.equal(0, rec.count("disconnect", { id = id }))
    end
    local load = R.load(port, 4)
    H.wait_until(function() return load.ok >= 40 end, 5000)
    load.stop()
    assert.is_true(H.wait_until(load.idle, 5000))
    assert.equal(0, load.failed, table.concat(load.failures, "\n"))
    local served = load.served_after(0)
    for _, id in ipairs(old) do assert.truthy(served[id], "old worker " .. id .. " does not serve") end
    -- a later reload with a working generation goes through
    R.write(control, "serve")
    local ok = false
    cluster.reload(function(e) assert.is_nil(e) ok = true end)
    assert.is_true(H.wait_until(function() return ok end, 10000), rec.dump())
    assert.equal(2, #live_ids())
    for _, id in ipairs(live_ids()) do
      for _, o in ipairs(old) do assert.are_not.equal(o, id) end
    end
    shutdown()
    H.finish()
  end

  it("stops when a new worker crashes: the old workers stay and serve, 'reloadFailed'", function()
    failing_generation("crash")
  end)

  it("stops when a new worker misses readiness: the old workers stay and serve, 'reloadFailed'", function()
    failing_generation("never", { readyTimeout = 400 })
  end)

  it("stops when new workers replaced two at a time both crash: the old workers stay and serve", function()
    failing_generation("crash", { reload = { concurrency = 2 } }, 2)
  end)

  it("respawns an old worker that died while its replacement was failing", function()
    local rec = start(2, { readyTimeout = 600 })
    local old = live_ids()
    R.write(control, "never")
    -- the replacement's failure is what releases the dead old worker: the generation
    -- after it works again
    cluster.once("reloadFailed", function() R.write(control, "serve") end)
    cluster.reload()
    cluster.workers[old[1]]:kill("SIGKILL")
    assert.is_true(H.wait_until(rec.has("reloadFailed"), 5000), rec.dump())
    assert.is_true(H.wait_until(rec.has("respawn", 1, { replaced = old[1] }), 3000), rec.dump())
    local new = rec.all("respawn", { replaced = old[1] })[1].id
    assert.is_true(H.wait_until(rec.has("ready", 1, { id = new }), 3000), rec.dump())
    assert.same({ old[2], new }, live_ids())
    shutdown()
    H.finish()
  end)

  it("stops when a new worker's ready() arrives after its readyTimeout: the old workers stay", function()
    failing_generation("late", { readyTimeout = 1000 })
  end)

  it("ends when cluster.shutdown() stops it, and the error says so (nobody stays)", function()
    local rec = start(2)
    R.write(control, "never")
    local err
    cluster.reload(function(e) err = e or false end)
    local done = false
    cluster.shutdown({ grace = 100, killTimeout = 100 }, function() done = true end)
    assert.is_true(H.wait_until(function() return done and err ~= nil end, 5000), rec.dump())
    assert.truthy(err, "reload called back without an error")
    assert.equal("ERR_RELOAD_FAILED", err.code)
    assert.matches("^reload: cluster.shutdown%(%) stopped it %(0 of 2 workers replaced%)$", tostring(err))
    assert.equal("cluster.shutdown() stopped it", rec.all("reloadFailed")[1].reason)
    assert.same({}, live_ids())
    H.finish()
  end)
end)

describe("supervise: SIGHUP", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("starts a rolling reload in a supervising master", function()
    local m = R.start_master(H, [[
      return { workers = 2, env = { SUP_MODE = "serve", SUP_PORT = "]] .. R.free_port() .. [[" },
        grace = 1000, killTimeout = 500 }
    ]])
    assert.is_true(H.wait_until(m.has("ready", 2), 5000), m.output())
    local first = m.pids()
    core.kill(m.pid, "SIGHUP")
    assert.is_true(H.wait_until(m.has("reloaded"), 5000), m.output())
    assert.equal(1, m.count("reload", { phase = "start" }))
    assert.equal(2, m.all("reloaded")[1].replaced)
    assert.equal(4, m.count("ready"), m.output())
    assert.is_true(H.wait_until(function()
      for _, pid in ipairs(first) do if H.alive(pid) then return false end end
      return true
    end, 3000), m.output())
    assert.is_true(H.alive(m.pid))
    -- and SIGTERM right after the reload still ends it gracefully
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(10000), m.output())
    H.cleanup_master(m)
    H.finish()
  end)
end)

describe("supervise: after many reloads", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {} }
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    H.teardown()
  end)

  it("a worker does not keep the generations before it alive (memory)", function()
    local forked = setmetatable({}, { __mode = "k" })
    cluster.on("fork", function(w) forked[w] = true end)
    local rec = R.record(cluster)
    cluster.supervise { workers = 2, readiness = "explicit", env = { SUP_MODE = "ready" },
      grace = 100, killTimeout = 100, signals = false, output = false }
    assert.is_true(H.wait_until(rec.has("ready", 2), 5000), rec.dump())
    for i = 1, 6 do
      local done
      cluster.reload(function(err) done = err or true end)
      assert.is_true(H.wait_until(function() return done ~= nil end, 5000), rec.dump())
      assert.is_true(done, tostring(done))
      assert.is_true(H.wait_until(rec.has("exit", 2 * i), 3000), rec.dump())
    end
    rec.events = {} -- (the record holds no workers, only their ids)
    for _ = 1, 3 do collectgarbage() end
    local reachable = 0
    for _ in pairs(forked) do reachable = reachable + 1 end
    assert.equal(2, reachable)
    local done = false
    cluster.shutdown(function() done = true end)
    assert.is_true(H.wait_until(function() return done end, 3000))
    H.finish()
  end)
end)
