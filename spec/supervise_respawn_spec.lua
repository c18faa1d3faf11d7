-- The supervisor's respawn decision by exit class: OTP's permanent (always), transient
-- (only after a failure), temporary (never), or a Lua function deciding per exit (now,
-- after a delay, or not). Each case runs three ready workers that end with exit 0,
-- exit 3 and SIGKILL. A respawned worker gets a new id and the replaced one's env.
local cluster = require "cluster"
local H = require "helper"
local R = require "fixtures.sup_lib"

local function options(restart)
  return {
    workers = 3, restart = restart, readiness = "explicit", readyTimeout = 5000,
    env = { SUP_MODE = "ready", SUP_TAG = "tag-1" },
    backoff = { initial = 10, factor = 2, max = 40, reset = 60000 },
    intensity = 100, period = 10, grace = 100, killTimeout = 100,
    signals = false, output = false,
  }
end

local function shutdown()
  local done = false
  cluster.shutdown({ grace = 100, killTimeout = 100 }, function() done = true end)
  assert.is_true(H.wait_until(function() return done end, 3000), "shutdown did not call back")
end

local function sorted_workers()
  local list = {}
  for _, w in pairs(cluster.workers) do list[#list + 1] = w end
  table.sort(list, function(a, b) return a.id < b.id end)
  return list
end

-- Asks a live worker for {id, pid, tag} over the channel.
local function info(w)
  local got
  w:once("message", function(m) got = m end)
  w:send({ cmd = "info" })
  assert.is_true(H.wait_until(function() return got ~= nil end, 3000), "no info from worker " .. w.id)
  return got
end

-- Starts the supervisor, ends worker 1 with exit 0, worker 2 with exit 3, worker 3 with
-- SIGKILL; returns the record and the first generation's exit times per id.
local function run_case(restart, settle_ms)
  local rec = R.record(cluster)
  cluster.supervise(options(restart))
  assert.is_true(H.wait_until(rec.has("ready", 3), 5000), rec.dump())
  local ws = sorted_workers()
  assert.equal(3, #ws)
  ws[1]:send({ cmd = "exit", code = 0 })
  ws[2]:send({ cmd = "exit", code = 3 })
  ws[3]:kill("SIGKILL")
  assert.is_true(H.wait_until(rec.has("exit", 3), 3000), rec.dump())
  -- give the decisions time to show (respawns, and none where none is due)
  H.run_for(settle_ms or 300)
  return rec, ws
end

-- The respawn event that replaced worker `id`, or nil.
local function respawn_of(rec, id)
  return rec.all("respawn", { replaced = id })[1]
end

-- Checks the replacement of `old`: a new id never used before, the same env, ready.
local function check_replacement(rec, old, first_ids)
  local e = respawn_of(rec, old.id)
  assert.truthy(e, "worker " .. old.id .. " was not respawned\n" .. rec.dump())
  assert.is_true(e.id > first_ids, "the new worker reuses an id: " .. e.id)
  assert.is_true(H.wait_until(rec.has("ready", 1, { id = e.id }), 3000), rec.dump())
  local w = cluster.workers[e.id]
  assert.truthy(w)
  local i = info(w)
  assert.equal(e.id, i.id)
  assert.equal(e.pid, i.pid)
  assert.are_not.equal(old.process.pid, i.pid)
  assert.equal("tag-1", i.tag)
  return e
end

describe("supervise: respawn decisions by exit class", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {} }
  end)
  after_each(function()
    pcall(cluster.shutdown, { grace = 0, killTimeout = 0 })
    H.teardown()
  end)

  it("permanent respawns after exit 0, exit 3 and SIGKILL, each with a new id and the same env", function()
    local rec, ws = run_case("permanent")
    for _, old in ipairs(ws) do check_replacement(rec, old, 3) end
    assert.equal(0, rec.count("giveup"))
    -- ids are never reused: the three new ones are distinct
    local seen = {}
    for _, e in ipairs(rec.all("respawn")) do
      assert.is_nil(seen[e.id])
      seen[e.id] = true
    end
    -- exit 0 is no failure: no backoff for it; exit 3 and SIGKILL back off
    assert.equal(0, respawn_of(rec, ws[1].id).delay)
    assert.is_true(respawn_of(rec, ws[2].id).delay >= 10)
    assert.is_true(respawn_of(rec, ws[3].id).delay >= 10)
    assert.equal(3, #sorted_workers())
    shutdown()
    H.finish()
  end)

  it("transient respawns after exit 3 and SIGKILL but not after exit 0 ('giveup')", function()
    local rec, ws = run_case("transient")
    assert.is_nil(respawn_of(rec, ws[1].id), rec.dump())
    assert.equal(1, rec.count("giveup", { id = ws[1].id, code = 0 }))
    check_replacement(rec, ws[2], 3)
    check_replacement(rec, ws[3], 3)
    assert.equal(2, #sorted_workers())
    shutdown()
    H.finish()
  end)

  it("temporary never respawns: exit 0, exit 3 and SIGKILL each give 'giveup'", function()
    local rec, ws = run_case("temporary")
    assert.equal(0, rec.count("respawn"), rec.dump())
    assert.equal(1, rec.count("giveup", { id = ws[1].id, code = 0 }))
    assert.equal(1, rec.count("giveup", { id = ws[2].id, code = 3 }))
    assert.equal(1, rec.count("giveup", { id = ws[3].id, signal = "SIGKILL" }))
    assert.is_nil(next(cluster.workers))
    shutdown()
    H.finish()
  end)

  it("a function decides per exit: false (not), \"now\", or a delay in ms", function()
    local calls = {}
    local exited_at = {}
    cluster.on("exit", function(w) exited_at[w.id] = R.now() end)
    local respawned_at = {}
    cluster.on("respawn", function(w, old) respawned_at[old.id] = R.now() end)
    local rec, ws = run_case(function(worker, code, signal)
      calls[#calls + 1] = { id = worker.id, code = code, signal = signal }
      if signal == "SIGKILL" then return 250 end
      if code == 3 then return "now" end
      return false
    end, 500)
    -- called once per exit, with the worker, its code and its signal
    assert.equal(3, #calls)
    table.sort(calls, function(a, b) return a.id < b.id end)
    assert.same({ id = ws[1].id, code = 0 }, calls[1])
    assert.same({ id = ws[2].id, code = 3 }, calls[2])
    assert.same({ id = ws[3].id, signal = "SIGKILL" }, calls[3])
    assert.is_nil(respawn_of(rec, ws[1].id))
    assert.equal(1, rec.count("giveup", { id = ws[1].id }))
    local now = check_replacement(rec, ws[2], 3)
    assert.equal(0, now.delay)
    local later = check_replacement(rec, ws[3], 3)
    assert.equal(250, later.delay)
    -- measured: "now" came before the 250 ms one, which waited its delay
    local waited_now = respawned_at[ws[2].id] - exited_at[ws[2].id]
    local waited_later = respawned_at[ws[3].id] - exited_at[ws[3].id]
    assert.is_true(waited_later >= 225, "respawned after " .. waited_later .. " ms, asked for 250")
    assert.is_true(waited_now < waited_later)
    shutdown()
    H.finish()
  end)

  it("a respawned worker gets the env of the worker it replaces", function()
    local rec = R.record(cluster)
    cluster.supervise(options("permanent"))
    assert.is_true(H.wait_until(rec.has("ready", 3), 5000), rec.dump())
    local ws = sorted_workers()
    -- this worker's env differs from the supervisor's: its replacement inherits it
    ws[2].env = { SUP_MODE = "ready", SUP_TAG = "tag-of-2" }
    ws[2]:kill("SIGKILL")
    ws[3]:kill("SIGKILL")
    assert.is_true(H.wait_until(function()
      return respawn_of(rec, ws[2].id) and respawn_of(rec, ws[3].id)
    end, 3000), rec.dump())
    local e2, e3 = respawn_of(rec, ws[2].id), respawn_of(rec, ws[3].id)
    assert.is_true(H.wait_until(function()
      return rec.count("ready", { id = e2.id }) == 1 and rec.count("ready", { id = e3.id }) == 1
    end, 3000), rec.dump())
    assert.equal("tag-of-2", info(cluster.workers[e2.id]).tag)
    assert.equal("tag-1", info(cluster.workers[e3.id]).tag)
    shutdown()
    H.finish()
  end)
end)

describe("supervise: a restart function's verdict", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("that is not one of false, true, \"now\" or a delay in ms >= 0 raises, naming the restart function", function()
    for bad, shown in pairs { ["-5"] = "-5", ["0/0"] = "nan", ['"later"'] = '"later"' } do
      local m = R.start_master(H, [[
        return { workers = 1, env = { SUP_MODE = "crash" }, restart = function() return ]] .. bad .. [[ end }
      ]])
      assert.equal(1, m.wait_exit(5000), m.output())
      local err = H.read_file(m.err)
      local at = err:find("supervise: the restart function returned ", 1, true)
      assert.truthy(at, m.output())
      assert.truthy(err:find(shown, at, true), m.output())
      H.cleanup_master(m)
    end
    H.finish()
  end)
end)
