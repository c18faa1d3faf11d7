-- Readiness: a supervised worker is ready at its first 'listening', or with
-- readiness = "explicit" when it calls cluster.worker:ready(). A worker not ready within
-- readyTimeout gets 'readyTimeout', is stopped, and counts as a failed start.
local cluster = require "cluster"
local H = require "helper"
local R = require "fixtures.sup_lib"

local function shutdown()
  local done = false
  cluster.shutdown({ grace = 100, killTimeout = 100 }, function() done = true end)
  assert.is_true(H.wait_until(function() return done end, 3000), "shutdown did not call back")
end

local function options(extra)
  local o = {
    workers = 1, restart = "permanent", readyTimeout = 5000,
    backoff = { initial = 50, factor = 2, max = 1000, reset = 60000 },
    intensity = 100, period = 10, grace = 100, killTimeout = 100, signals = false, output = false,
  }
  for k, v in pairs(extra) do o[k] = v end
  return o
end

local function index_of(rec, name, where)
  for i, e in ipairs(rec.events) do
    local ok = e.name == name
    for k, v in pairs(where or {}) do if e[k] ~= v then ok = false end end
    if ok then return i end
  end
end

describe("supervise: readiness", function()
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

  it("by default a worker is ready at its first 'listening'", function()
    local rec = R.record(cluster)
    cluster.supervise(options { workers = 2, env = { SUP_MODE = "serve", SUP_DELAY = "100" } })
    assert.is_true(H.wait_until(rec.has("ready", 2), 5000), rec.dump())
    for _, e in ipairs(rec.all("ready")) do
      local li = index_of(rec, "listening", { id = e.id })
      assert.truthy(li, "ready before any 'listening'\n" .. rec.dump())
      assert.is_true(li < index_of(rec, "ready", { id = e.id }))
      assert.is_true(cluster.workers[e.id]:stats().ready)
    end
    assert.equal(0, rec.count("readyTimeout"))
    shutdown()
    H.finish()
  end)

  it("readiness = \"explicit\": cluster.worker:ready() makes a worker ready, 'listening' does not", function()
    R.write(control, "ready")
    local rec = R.record(cluster)
    cluster.supervise(options { readiness = "explicit", readyTimeout = 600, env = { SUP_CONTROL = control } })
    assert.is_true(H.wait_until(rec.has("ready", 1), 5000), rec.dump())
    local first = rec.all("ready")[1].id
    -- the second worker listens but never calls ready()
    R.write(control, "serve")
    cluster.scale(2)
    assert.is_true(H.wait_until(rec.has("listening", 1), 5000), rec.dump())
    local second = rec.all("listening")[1].id
    assert.are_not.equal(first, second)
    assert.is_true(H.wait_until(rec.has("readyTimeout", 1, { id = second }), 3000), rec.dump())
    assert.equal(0, rec.count("ready", { id = second }))
    assert.is_true(cluster.workers[first]:stats().ready)
    shutdown()
    H.finish()
  end)

  it("a worker that misses readyTimeout is reported, stopped, and counts as a failed start", function()
    R.write(control, "never")
    local forked_at, timeouts = {}, {}
    cluster.on("fork", function(w) forked_at[w.id] = R.now() end)
    cluster.on("readyTimeout", function(w) timeouts[w.id] = R.now() - forked_at[w.id] end)
    local rec = R.record(cluster)
    -- transient: a clean exit would not be restarted, a failed start is
    cluster.supervise(options { restart = "transient", readiness = "explicit", readyTimeout = 300,
      env = { SUP_CONTROL = control } })
    assert.is_true(H.wait_until(rec.has("readyTimeout", 1), 3000), rec.dump())
    local id = rec.all("readyTimeout")[1].id
    assert.is_true(timeouts[id] >= 280, "readyTimeout after " .. timeouts[id] .. " ms, configured 300")
    R.write(control, "ready")
    assert.is_true(H.wait_until(rec.has("exit", 1, { id = id }), 3000), rec.dump())
    assert.is_true(H.wait_until(rec.has("respawn", 1, { replaced = id }), 3000), rec.dump())
    -- restarted with backoff, as a failure is
    assert.equal(50, rec.all("respawn", { replaced = id })[1].delay)
    local new = rec.all("respawn", { replaced = id })[1].id
    assert.is_true(H.wait_until(rec.has("ready", 1, { id = new }), 3000), rec.dump())
    assert.equal(0, rec.count("ready", { id = id }))
    assert.equal(0, rec.count("giveup"))
    shutdown()
    H.finish()
  end)
end)
