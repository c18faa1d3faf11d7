-- Crash loops: at most `intensity` restarts within `period` seconds (Erlang/OTP's
-- MaxR/MaxT); the failure that would need one more is a crash loop,
-- and onCrashLoop(info) gives the verdict: "retry" after a pause, "hold" (no more
-- restarts, the master stays up and says so), or "exit" with a code. The default verdict
-- pauses (crashLoopPause) and does not spin the CPU. Each case is a master of its own
-- (spec/fixtures/sup_master.lua) whose workers crash at once.
local H = require "helper"
local R = require "fixtures.sup_lib"
local core = require "cluster.core"

-- Options for workers that always crash: fast backoff, a crash loop after 3 restarts
-- (at the fourth failure).
local function chunk(extra)
  return [[
    local cluster, lib = ...
    return {
      workers = 1, restart = "permanent", env = { SUP_MODE = "crash", SUP_CODE = "2" },
      backoff = { initial = 10, factor = 1, max = 10, reset = 60000 },
      intensity = 3, period = 10, grace = 100, killTimeout = 100,
      ]] .. (extra or "") .. [[
    }
  ]]
end

local function all_gone(pids)
  for _, pid in ipairs(pids) do if H.alive(pid) then return false end end
  return true
end

describe("supervise: crash loops", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("\"retry\" with a pause: 'crashloop' fires, restarts stop for the pause, then resume", function()
    local m = R.start_master(H, chunk [[
      onCrashLoop = function(info)
        io.stdout:write("HOOK restarts=" .. info.restarts .. " period=" .. info.period .. "\n")
        return "retry", 500
      end,
    ]])
    assert.is_true(H.wait_until(m.has("crashloop", 2), 5000), m.output())
    local loops = m.all("crashloop")
    assert.equal("retry", loops[1].verdict)
    assert.equal(500, loops[1].pause)
    local out = H.read_file(m.out)
    -- intensity (3) restarts within the period, and a failure that would need a fourth
    assert.truthy(out:find("HOOK restarts=3 period=10", 1, true), m.output())
    -- the first respawn after the verdict waited the pause; the ones before did not
    local events = m.events()
    local after, before_count
    for i, e in ipairs(events) do
      if e.name == "crashloop" then
        before_count = 0
        for j = 1, i - 1 do if events[j].name == "respawn" then before_count = before_count + 1 end end
        for j = i + 1, #events do
          if events[j].name == "respawn" then after = events[j] break end
        end
        assert.truthy(after, m.output())
        assert.is_true(after.delay >= 500, m.output())
        assert.is_true(after.t - e.t >= 480, "restarted " .. (after.t - e.t) .. " ms after the crash loop\n" .. m.output())
        break
      end
    end
    assert.equal(3, before_count, m.output())
    -- and it kept trying: a second crash loop came after further restarts
    assert.is_true(m.count("respawn") >= 6, m.output())
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit())
    assert.is_true(H.wait_until(function() return all_gone(m.pids()) end, 2000))
    H.cleanup_master(m)
    H.finish()
  end)

  it("\"retry\" pauses every restart, those of the other workers too", function()
    local m = R.start_master(H, [[
      local cluster, lib = ...
      return {
        workers = 3, restart = "permanent", env = { SUP_MODE = "crash", SUP_CODE = "2", SUP_DELAY = "50" },
        backoff = { initial = 10, factor = 1, max = 10, reset = 60000 },
        intensity = 3, period = 10, crashLoopPause = 1500, grace = 100, killTimeout = 100,
      }
    ]])
    assert.is_true(H.wait_until(m.has("crashloop"), 5000), m.output())
    -- every worker has crashed again by now; none is restarted until the pause is over
    H.run_for(1000)
    local loop_at = m.all("crashloop")[1].t
    assert.equal(1, m.count("crashloop"), m.output())
    for _, e in ipairs(m.all("respawn")) do
      assert.is_false(e.t > loop_at and e.t < loop_at + 1400, "restarted during the pause\n" .. m.output())
    end
    -- then all three come back
    assert.is_true(H.wait_until(function()
      local n = 0
      for _, e in ipairs(m.all("respawn")) do if e.t > loop_at then n = n + 1 end end
      return n >= 3
    end, 3000), m.output())
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit())
    assert.is_true(H.wait_until(function() return all_gone(m.pids()) end, 2000))
    H.cleanup_master(m)
    H.finish()
  end)

  it("\"hold\": no more restarts, the master stays up, says so on stderr and fires 'hold'; SIGHUP or SIGTTIN resumes", function()
    local control = H.tmpname("control")
    R.write(control, "crash")
    local m = R.start_master(H, [[
      return {
        workers = 1, restart = "permanent", readiness = "explicit", env = { SUP_CONTROL = "]] .. control .. [[" },
        backoff = { initial = 10, factor = 1, max = 10, reset = 60000 },
        intensity = 3, period = 10, grace = 100, killTimeout = 100,
        onCrashLoop = function() return "hold" end,
      }
    ]])
    assert.is_true(H.wait_until(m.has("hold"), 5000), m.output())
    assert.equal(1, m.count("crashloop", { verdict = "hold" }))
    local forks = m.count("fork")
    local cpu0 = R.cpu_seconds(m.pid)
    H.run_for(800)
    -- still up, idle, and no worker forked while held
    assert.is_true(H.alive(m.pid))
    assert.is_nil(H.master_status(m))
    assert.equal(forks, m.count("fork"), m.output())
    assert.is_true(R.cpu_seconds(m.pid) - cpu0 < 0.2, "the held master is busy")
    assert.truthy(H.read_file(m.err):find("crash loop", 1, true), m.output())
    assert.truthy(H.read_file(m.err):find("holding", 1, true), m.output())
    assert.is_true(all_gone(m.pids()))
    -- the code is fixed; SIGHUP (a reload) brings the configured worker back
    R.write(control, "ready")
    core.kill(m.pid, "SIGHUP")
    assert.is_true(H.wait_until(m.has("ready"), 3000), m.output())
    assert.is_true(H.wait_until(m.has("reloaded"), 3000), m.output())
    -- SIGTTIN (scale up by one) works from there
    core.kill(m.pid, "SIGTTIN")
    assert.is_true(H.wait_until(m.has("ready", 2), 3000), m.output())
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(), m.output())
    assert.is_true(H.wait_until(function() return all_gone(m.pids()) end, 2000))
    H.cleanup_master(m)
    os.remove(control)
    H.finish()
  end)

  it("\"hold\" then SIGTTIN: scaling resumes restarts", function()
    local m = R.start_master(H, chunk [[ onCrashLoop = function() return "hold" end, ]])
    assert.is_true(H.wait_until(m.has("hold"), 5000), m.output())
    local forks = m.count("fork")
    core.kill(m.pid, "SIGTTIN")
    assert.is_true(H.wait_until(function() return m.count("fork") > forks end, 3000), m.output())
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(), m.output())
    assert.is_true(H.wait_until(function() return all_gone(m.pids()) end, 2000))
    H.cleanup_master(m)
    H.finish()
  end)

  it("\"hold\" then a resume: the restarts before the hold no longer count", function()
    local control = H.tmpname("control")
    R.write(control, "crash")
    local m = R.start_master(H, [[
      local cluster = ...
      -- once resumed and ready, the worker fails once: a restart, not a crash loop
      cluster.on("ready", function(w) w:send({ cmd = "exit", code = 1 }) cluster.removeAllListeners("ready") end)
      return {
        workers = 1, restart = "permanent", readiness = "explicit", env = { SUP_CONTROL = "]] .. control .. [[" },
        backoff = { initial = 10, factor = 1, max = 10, reset = 60000 },
        intensity = 3, period = 60, grace = 100, killTimeout = 100,
        onCrashLoop = function() return "hold" end,
      }
    ]])
    assert.is_true(H.wait_until(m.has("hold"), 5000), m.output())
    R.write(control, "ready")
    core.kill(m.pid, "SIGTTIN")
    assert.is_true(H.wait_until(m.has("respawn", 4), 3000), m.output())
    H.run_for(300)
    assert.equal(1, m.count("hold"), m.output())
    assert.equal(1, m.count("crashloop"), m.output())
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(), m.output())
    assert.is_true(H.wait_until(function() return all_gone(m.pids()) end, 2000))
    H.cleanup_master(m)
    os.remove(control)
    H.finish()
  end)

  it("\"exit\" with a code: the master stops its workers and exits with that code", function()
    local m = R.start_master(H, chunk [[ onCrashLoop = function() return "exit", 7 end, ]])
    assert.equal(7, m.wait_exit(5000), m.output())
    assert.equal(1, m.count("crashloop", { verdict = "exit", exitCode = 7 }), m.output())
    assert.truthy(H.read_file(m.err):find("exit code 7", 1, true), m.output())
    assert.is_true(H.wait_until(function() return all_gone(m.pids()) end, 2000))
    H.cleanup_master(m)
    H.finish()
  end)

  it("a period that is not a whole number of seconds: the verdict is carried out and said as given", function()
    local m = R.start_master(H, chunk [[ period = 2.5, onCrashLoop = function() return "exit", 7 end, ]])
    assert.equal(7, m.wait_exit(5000), m.output())
    assert.truthy(H.read_file(m.err):find("(3 restarts in 2.5s)", 1, true), m.output())
    assert.is_true(H.wait_until(function() return all_gone(m.pids()) end, 2000))
    H.cleanup_master(m)
    H.finish()
  end)

  it("a verdict onCrashLoop cannot mean raises in the master, naming onCrashLoop; its workers do not outlive it", function()
    for _, verdict in ipairs { [["later"]], [["retry", -1]], [["exit", 1.5]] } do
      local m = R.start_master(H, chunk(" onCrashLoop = function() return " .. verdict .. " end, "))
      assert.equal(1, m.wait_exit(5000), m.output())
      assert.truthy(H.read_file(m.err):find("supervise: onCrashLoop returned", 1, true), m.output())
      assert.equal(0, m.count("crashloop"), m.output())
      assert.is_true(H.wait_until(function() return all_gone(m.pids()) end, 3000))
      H.cleanup_master(m)
    end
    H.finish()
  end)

  it("onCrashLoop returning nothing takes the default verdict", function()
    local m = R.start_master(H, chunk [[ onCrashLoop = function() end, ]])
    assert.is_true(H.wait_until(m.has("crashloop"), 5000), m.output())
    assert.equal(1, m.count("crashloop", { verdict = "retry", pause = 30000 }), m.output())
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit(), m.output())
    H.cleanup_master(m)
    H.finish()
  end)

  it("the default verdict retries after crashLoopPause without spinning the CPU", function()
    local m = R.start_master(H, chunk())
    assert.is_true(H.wait_until(m.has("crashloop"), 5000), m.output())
    assert.equal(1, m.count("crashloop", { verdict = "retry", pause = 30000 }), m.output())
    local forks = m.count("fork")
    local cpu0 = R.cpu_seconds(m.pid)
    H.run_for(1000)
    assert.is_true(H.alive(m.pid))
    assert.equal(forks, m.count("fork"), "restarted during the pause\n" .. m.output())
    assert.is_true(R.cpu_seconds(m.pid) - cpu0 < 0.2, "the pausing master is busy")
    core.kill(m.pid, "SIGTERM")
    assert.equal(0, m.wait_exit())
    H.cleanup_master(m)
    H.finish()
  end)
end)
