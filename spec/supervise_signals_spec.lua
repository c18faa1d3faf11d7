-- Signals as events: cluster.on("SIGxxx", fn) handles any signal in the master; a
-- listener replaces the default action (the supervisor's SIGTERM shutdown, SIGHUP
-- reload...). Workers can listen too.
local cluster = require "cluster"
local core = require "cluster.core"
local H = require "helper"
local R = require "fixtures.sup_lib"

describe("signals as events", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("cluster.on(\"SIGUSR2\", fn) runs fn in this process when it gets SIGUSR2", function()
    local got = {}
    local function on_usr2(name) got[#got + 1] = name end
    cluster.on("SIGUSR2", on_usr2)
    os.execute("kill -USR2 " .. core.getpid())
    assert.is_true(H.wait_until(function() return #got >= 1 end, 3000))
    os.execute("kill -USR2 " .. core.getpid())
    assert.is_true(H.wait_until(function() return #got >= 2 end, 3000))
    assert.same({ "SIGUSR2", "SIGUSR2" }, got)
    -- the watcher does not keep the loop alive
    cluster.off("SIGUSR2", on_usr2)
    H.finish()
  end)

  it("SIGINT (Ctrl-C) ends a master idle in cluster.run() at once, as in Node, unless it listens for it", function()
    for _, listening in ipairs { false, true } do
      local m = H.spawn_master(H.fixture("idle_master.lua"), {}, { IDLE_SIGINT_LISTENER = listening and "1" or nil })
      local worker
      assert.is_true(H.wait_until(function()
        worker = math.tointeger(tonumber(((H.read_file(m.out) or ""):match("WORKER (%d+)"))))
        return worker ~= nil
      end, 5000), H.read_file(m.err))
      H.track(worker)
      core.kill(m.pid, "SIGINT")
      if listening then
        assert.is_true(H.wait_until(function() return (H.read_file(m.out) or ""):find("GOT SIGINT\n", 1, true) ~= nil end, 3000))
        H.run_for(100)
        assert.is_true(H.alive(m.pid), "a master listening for SIGINT died of it")
        core.kill(m.pid, "SIGTERM")
      end
      assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 3000), "the master is still running")
      -- the shell's status of a process ended by a signal: 128 + its number
      assert.equal(listening and 128 + 15 or 128 + 2, H.master_status(m), H.read_file(m.err))
      assert.is_nil((H.read_file(m.err) or ""):find("interrupted", 1, true), H.read_file(m.err)) -- (lua5.4's)
      assert.is_true(H.wait_until(function() return not H.alive(worker) end, 3000), "the worker outlived its master")
      H.cleanup_master(m)
    end
    H.finish()
  end)

  it("a listener overrides the supervisor's default: SIGTERM and SIGHUP handled by the script", function()
    local m = R.start_master(H, [[
      local cluster = ...
      cluster.on("SIGTERM", function(name) print("GOT " .. name) end)
      cluster.on("SIGHUP", function(name) print("GOT " .. name) end)
      cluster.on("SIGUSR2", function(name)
        print("GOT " .. name)
        cluster.shutdown(function() os.exit(5) end)
      end)
      return { workers = 1, readiness = "explicit", env = { SUP_MODE = "ready" }, grace = 500, killTimeout = 500 }
    ]])
    assert.is_true(H.wait_until(m.has("ready"), 5000), m.output())
    core.kill(m.pid, "SIGTERM")
    core.kill(m.pid, "SIGHUP")
    assert.is_true(H.wait_until(function()
      local out = H.read_file(m.out) or ""
      return out:find("GOT SIGTERM\n", 1, true) and out:find("GOT SIGHUP\n", 1, true)
    end, 3000), m.output())
    H.run_for(200)
    -- no shutdown, no reload: the script's handlers replaced them
    assert.is_true(H.alive(m.pid))
    assert.equal(0, m.count("shutdown"), m.output())
    assert.equal(0, m.count("reload"), m.output())
    core.kill(m.pid, "SIGUSR2")
    assert.equal(5, m.wait_exit(5000), m.output())
    assert.equal(1, m.count("shutdown"), m.output())
    for _, pid in ipairs(m.pids()) do assert.is_true(H.wait_until(function() return not H.alive(pid) end, 2000)) end
    H.cleanup_master(m)
    H.finish()
  end)

  it("a script's signal listeners keep working after cluster.shutdown()", function()
    local m = R.start_master(H, [[
      local cluster = ...
      cluster.on("SIGUSR2", function(name) print("GOT " .. name) end)
      cluster.on("SIGUSR1", function() cluster.shutdown(function() print("SHUTDOWN DONE") end) end)
      cluster.setInterval(function() end, 1000) -- stays up after the shutdown
      return { workers = 1, readiness = "explicit", env = { SUP_MODE = "ready" }, grace = 500, killTimeout = 500 }
    ]])
    assert.is_true(H.wait_until(m.has("ready"), 5000), m.output())
    core.kill(m.pid, "SIGUSR1")
    assert.is_true(H.wait_until(function() return (H.read_file(m.out) or ""):find("SHUTDOWN DONE\n", 1, true) end, 3000), m.output())
    core.kill(m.pid, "SIGUSR2")
    assert.is_true(H.wait_until(function() return (H.read_file(m.out) or ""):find("GOT SIGUSR2\n", 1, true) end, 3000), m.output())
    H.run_for(100)
    assert.is_true(H.alive(m.pid), "the master died of SIGUSR2: " .. tostring(H.master_status(m)))
    core.kill(m.pid, "SIGKILL")
    m.wait_exit()
    H.cleanup_master(m)
    H.finish()
  end)

  it("a worker handles a signal with cluster.on too (the stubborn fixture ignores SIGTERM)", function()
    cluster.setupMaster { exec = H.fixture("sup_worker.lua"), args = {}, silent = true }
    local lines = {}
    cluster.on("output", function(_, _, line) lines[#lines + 1] = line end)
    local w = cluster.fork({ SUP_MODE = "stubborn" })
    -- it calls cluster.worker:ready() once its handler is in place
    local ready = false
    cluster.on("ready", function(rw) if rw == w then ready = true end end)
    assert.is_true(H.wait_until(function() return ready end, 5000))
    w:kill("SIGTERM")
    assert.is_true(H.wait_until(function() return #lines >= 1 end, 3000))
    assert.equal("stubborn: ignoring SIGTERM", lines[1])
    assert.is_false(w:isDead())
    w:kill("SIGKILL")
    assert.is_true(H.wait_until(function() return w:isDead() end, 3000))
    cluster.setupMaster { silent = false }
    H.finish()
  end)
end)
