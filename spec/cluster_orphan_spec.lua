-- No worker outlives its master: masters here are separate lua5.4 processes
-- (spec/fixtures/master_orphan.lua) that print their workers' pids; the spec kills or
-- breaks them and watches the pids. Node's test-cluster-primary-kill and -primary-error.
local H = require "helper"

-- Starts a master and waits for "ready"; returns it with its workers' pids.
local function start_master(kind, action, n)
  local m = H.spawn_master(H.fixture("master_orphan.lua"), { kind, action, tostring(n) })
  local ready = H.wait_until(function()
    local out = H.read_file(m.out) or ""
    return out:find("ready\n", 1, true) ~= nil or H.master_status(m) ~= nil
  end, 5000)
  local out = H.read_file(m.out) or ""
  assert(ready and out:find("ready\n", 1, true), "the master did not get ready: " .. out .. (H.read_file(m.err) or ""))
  m.pids = {}
  for pid in out:gmatch("worker (%d+)\n") do m.pids[#m.pids + 1] = H.track(pid) end
  assert.equal(n, #m.pids)
  return m
end

local function all_gone(pids)
  return function()
    for _, pid in ipairs(pids) do if H.alive(pid) then return false end end
    return true
  end
end

local function any_alive(pids)
  for _, pid in ipairs(pids) do if H.alive(pid) then return true end end
  return false
end

describe("workers of a dead master", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("end within a second when the master is killed with SIGKILL", function()
    local m = start_master("idle", "wait", 2)
    assert.is_true(any_alive(m.pids))
    require("cluster.core").kill(m.pid, "SIGKILL")
    assert.is_true(H.wait_until(function() return not H.alive(m.pid) end, 2000))
    assert.is_true(H.wait_until(all_gone(m.pids), 1000), "a worker outlived its master by more than a second")
    H.cleanup_master(m)
    H.finish()
  end)

  it("end within a second when the master is killed with SIGKILL, even stuck in `while true do end`", function()
    local m = start_master("spin", "wait", 2)
    -- still spinning a while later: only the orphan guard can end them
    H.run_for(100)
    assert.is_true(any_alive(m.pids))
    require("cluster.core").kill(m.pid, "SIGKILL")
    assert.is_true(H.wait_until(function() return not H.alive(m.pid) end, 2000))
    assert.is_true(H.wait_until(all_gone(m.pids), 1000), "a spinning worker outlived its master by more than a second")
    H.cleanup_master(m)
    H.finish()
  end)

  it("end when the master died before they loaded the cluster module, even stuck in `while true do end`", function()
    local m = H.spawn_master(H.fixture("life_master_early_death.lua"), { "2" })
    assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000))
    local pids = {}
    for pid in (H.read_file(m.out) or ""):gmatch("worker (%d+)\n") do pids[#pids + 1] = H.track(pid) end
    assert.equal(2, #pids)
    assert.is_true(H.wait_until(all_gone(pids), 5000), "a worker outlived a master that died before it started")
    H.cleanup_master(m)
    H.finish()
  end)

  it("primary-kill (Node test-cluster-primary-kill): when the master exits on purpose with code 0, its workers end", function()
    local m = start_master("idle", "exit", 1)
    assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000))
    assert.equal(0, H.master_status(m))
    assert.is_true(H.wait_until(all_gone(m.pids), 1000))
    H.cleanup_master(m)
    H.finish()
  end)

  it("primary-error (Node test-cluster-primary-error): an error raised in a callback stops cluster.run(), which re-raises it with a traceback; the master exits 1 and its workers end", function()
    local m = start_master("idle", "error", 2)
    assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000))
    assert.equal(1, H.master_status(m))
    local err = H.read_file(m.err)
    assert.truthy(err:find("accidental error", 1, true), err)
    assert.truthy(err:find("stack traceback", 1, true), err)
    -- the traceback reaches into the callback that raised, not just the call to run()
    assert.truthy(err:find("explode", 1, true), err)
    -- run() did not return normally
    assert.falsy((H.read_file(m.out) or ""):find("run returned", 1, true))
    assert.is_true(H.wait_until(all_gone(m.pids), 1000))
    H.cleanup_master(m)
    H.finish()
  end)

  it("spinning workers end too when their master dies of an error", function()
    local m = start_master("spin", "error", 1)
    assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000))
    assert.equal(1, H.master_status(m))
    assert.is_true(H.wait_until(all_gone(m.pids), 1000))
    H.cleanup_master(m)
    H.finish()
  end)
end)
