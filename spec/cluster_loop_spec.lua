-- The event loop and timers: run, poll, stop, setTimeout/setInterval/clearTimeout and
-- their argument errors, errors raised in callbacks.
local cluster = require "cluster"
local core = require "cluster.core"
local H = require "helper"

local function raised(fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error")
  return tostring(err)
end

local function has(s, ...)
  for _, needle in ipairs { ... } do
    assert(s:find(needle, 1, true), string.format("%q not found in error %q", needle, s))
  end
end

-- Runs cluster.run() with an unref'd guard that stops it after ms; returns what run
-- returned and whether the guard had to stop it.
local function run_guarded(ms)
  local guard_fired = false
  local guard = cluster.setTimeout(function()
    guard_fired = true
    cluster.stop()
  end, ms or 3000):unref()
  local stopped = cluster.run()
  cluster.clearTimeout(guard)
  return stopped, guard_fired
end

describe("cluster loop and timers", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("worker.lua") }
  end)
  after_each(H.teardown)

  it("setTimeout runs fn once, later, with its extra arguments (nil included)", function()
    local calls = {}
    cluster.setTimeout(H.expect(function(...) calls[#calls + 1] = table.pack(...) end), 5, "a", nil, 3)
    assert.equal(0, #calls)
    assert.is_true(H.wait_until(function() return #calls == 1 end, 2000))
    H.run_for(30)
    assert.equal(1, #calls)
    assert.equal(3, calls[1].n)
    assert.equal("a", calls[1][1])
    assert.is_nil(calls[1][2])
    assert.equal(3, calls[1][3])
    H.finish()
  end)

  it("setTimeout with no delay or 0 still runs later, never inside the call; timers fire by delay, then in creation order", function()
    local order = {}
    cluster.setTimeout(function() order[#order + 1] = "30ms" end, 30)
    cluster.setTimeout(function() order[#order + 1] = "0-a" end, 0)
    cluster.setTimeout(function() order[#order + 1] = "nil" end)
    cluster.setTimeout(function() order[#order + 1] = "0-b" end, 0)
    cluster.setTimeout(function() order[#order + 1] = "10ms" end, 10)
    assert.equal(0, #order)
    assert.is_true(H.wait_until(function() return #order == 5 end, 2000))
    assert.same({ "0-a", "nil", "0-b", "10ms", "30ms" }, order)
    H.finish()
  end)

  it("setInterval repeats until clearInterval, which also works from inside the callback", function()
    local n = 0
    local t
    t = cluster.setInterval(function(step)
      n = n + step
      if n == 3 then cluster.clearInterval(t) end
    end, 5, 1)
    assert.is_true(H.wait_until(function() return n == 3 end, 2000))
    H.run_for(40)
    assert.equal(3, n)
    H.finish()
  end)

  it("clearTimeout cancels a pending timer; clearing nil, a fired or an already cleared timer does nothing", function()
    local fired = false
    local t = cluster.setTimeout(function() fired = true end, 10)
    cluster.clearTimeout(t)
    cluster.clearTimeout(t)
    cluster.clearTimeout(nil)
    H.run_for(40)
    assert.is_false(fired)
    local done = cluster.setTimeout(H.expect(), 0)
    H.run_for(20)
    cluster.clearTimeout(done)
    cluster.clearInterval(done)
    H.finish()
  end)

  it("setTimeout, setInterval and clearTimeout raise on bad arguments, naming the function and argument", function()
    local f = function() end
    has(raised(cluster.setTimeout, "x", 10), "setTimeout", "callback", "string")
    has(raised(cluster.setTimeout, nil, 10), "setTimeout", "callback")
    has(raised(cluster.setTimeout, f, -1), "setTimeout", "delay")
    has(raised(cluster.setTimeout, f, "10"), "setTimeout", "delay")
    has(raised(cluster.setTimeout, f, 0 / 0), "setTimeout", "delay")
    has(raised(cluster.setTimeout, f, math.huge), "setTimeout", "delay")
    has(raised(cluster.setInterval, f, 1e300), "setInterval", "delay")
    has(raised(cluster.setInterval, 42, 10), "setInterval", "callback", "number")
    has(raised(cluster.setInterval, f, -5), "setInterval", "delay")
    has(raised(cluster.setInterval, f, {}), "setInterval", "delay")
    has(raised(cluster.clearTimeout, {}), "clearTimeout", "timer")
    has(raised(cluster.clearTimeout, 42), "clearTimeout", "timer")
    has(raised(cluster.clearInterval, "t"), "timer")
    H.finish()
  end)

  -- handles that share a callback share its registry reference, counted (csrc/util.c)
  it("handles sharing callbacks each run their own, while others sharing them close, restart with another, or close from inside it", function()
    local ran = {}
    local fns = {}
    for f = 1, 12 do -- more functions than there are shared references
      fns[f] = function() ran[#ran + 1] = f end
    end
    -- each function is shared by four timers: one closes before it fires, one is
    -- restarted with the next function, two fire with it
    local timers, want = {}, {}
    for i = 1, 48 do
      local t = core.timer()
      timers[i] = t
      t:start(5, 0, fns[(i - 1) % 12 + 1])
    end
    for i = 1, 12 do timers[i]:close() end
    for i = 13, 24 do timers[i]:start(5, 0, fns[(i - 1) % 12 + 1 == 12 and 1 or (i - 1) % 12 + 2]) end
    for i = 13, 48 do
      local f = (i - 1) % 12 + 1
      want[#want + 1] = i <= 24 and f % 12 + 1 or f
    end
    table.sort(want)
    assert.is_true(H.wait_until(function() return #ran >= #want end))
    H.run_for(20)
    table.sort(ran)
    assert.same(want, ran)
    -- repeating timers sharing one callback, which closes one of them each time it runs
    local queue, fired = {}, 0
    local function close_next()
      fired = fired + 1
      table.remove(queue, 1):close()
    end
    for i = 1, 6 do
      queue[i] = core.timer()
      queue[i]:start(1, 1, close_next)
    end
    assert.is_true(H.wait_until(function() return #queue == 0 end))
    H.run_for(20)
    assert.equal(6, fired)
    for i = 13, 48 do timers[i]:close() end
    H.finish()
  end)

  it("an open handle nobody references keeps working; once closed, one full collection frees it", function()
    local weak = setmetatable({}, { __mode = "k" })
    local fired, closed = 0, false
    do
      local t = core.timer()
      weak[t] = true
      t:start(1, 1, function() fired = fired + 1 end)
    end
    collectgarbage()
    collectgarbage()
    assert.is_not_nil(next(weak)) -- pinned while open
    assert.is_true(H.wait_until(function() return fired >= 3 end))
    next(weak):close(function() closed = true end)
    assert.is_true(H.wait_until(function() return closed end))
    collectgarbage()
    -- (a handle with a finalizer would stay a key here until a second collection)
    assert.is_nil(next(weak))
  end)

  it("run and poll called from inside a callback of the running loop raise (libuv's loop is not reentrant)", function()
    local errs = {}
    cluster.setTimeout(function()
      for _, name in ipairs { "poll", "run" } do
        local ok, err = pcall(cluster[name])
        errs[name] = not ok and tostring(err) or "no error"
      end
    end, 0)
    assert.is_true(H.wait_until(function() return errs.run ~= nil end, 2000))
    has(errs.poll, "cluster.poll: the loop is running already")
    has(errs.run, "cluster.run: the loop is running already")
    -- and the loop still runs from outside
    local fired = false
    cluster.setTimeout(function() fired = true end, 0)
    assert.is_true(H.wait_until(function() return fired end, 2000))
    H.finish()
  end)

  it("the C core refuses what would wrap around: pids, ports, backlogs, windows, timeouts", function()
    has(raised(core.kill, 0, 0), "process id")
    has(raised(core.kill, -1, 0), "process id")
    has(raised(core.kill, 2 ^ 32 + core.getpid(), 0), "process id")
    has(raised(core.rr_listen, "tcp", "127.0.0.1", 65536 + 1), "port")
    has(raised(core.rr_listen, "tcp", "127.0.0.1", -1), "port")
    has(raised(core.rr_listen, "tcp", "127.0.0.1", 0, -5), "backlog")
    has(raised(core.rr_listen, "tcp", "127.0.0.1", 0, 511, false, 0), "window")
    -- an args table whose __len lies is read by its true length
    local args = setmetatable({ "a" }, { __len = function() return -2 end })
    local ok = pcall(core.spawn, { file = "/nonexistent", args = args, on_exit = function() end })
    assert.is_true(ok) -- (spawn fails with ENOENT, as a result, not an error)
    H.finish()
  end)

  it("a handle in a to-be-closed variable is closed when its scope ends by an error, and the error is kept", function()
    local t
    local ok, err = pcall(function()
      local timer <close> = core.timer()
      t = timer
      error("the original error")
    end)
    assert.is_false(ok)
    has(tostring(err), "the original error")
    -- (closing finishes on the loop's next turn)
    assert.is_true(H.wait_until(function() return tostring(t):find("(closed)", 1, true) ~= nil end, 1000), tostring(t))
    -- __tostring of something else is an argument error, not a crash
    has(raised(getmetatable(core.timer()).__tostring, "x"), "cluster handle")
    H.finish()
  end)

  it("cluster.defer runs functions on a later turn, in order, with their arguments", function()
    local order = {}
    cluster.defer(function(x) order[#order + 1] = x end, 1)
    cluster.defer(function(x, y) order[#order + 1] = x + y end, 1, 1)
    assert.equal(0, #order)
    assert.is_true(H.wait_until(function() return #order == 2 end, 2000))
    assert.same({ 1, 2 }, order)
    H.finish()
  end)

  it("cluster.poll() makes progress without blocking: it returns while a long timer is pending, and polling alone brings a worker online", function()
    local late = false
    local t = cluster.setTimeout(function() late = true end, 3000)
    local remaining = cluster.poll()
    assert.is_true(remaining)
    assert.is_false(late)

    local w = cluster.fork()
    local online = false
    w:on("online", function() online = true end)
    local deadline = core.hrtime() + 5
    while not online and core.hrtime() < deadline do
      cluster.poll()
    end
    assert.is_true(online)
    assert.is_false(late)
    cluster.clearTimeout(t)
    w:kill()
    H.finish()
  end)

  it("cluster.run() returns once nothing is left to do, false when not stopped", function()
    local fired = 0
    cluster.setTimeout(function() fired = fired + 1 end, 5)
    cluster.setTimeout(function() fired = fired + 1 end, 15)
    local stopped, guard = run_guarded(3000)
    assert.is_false(guard)
    assert.is_false(stopped)
    assert.equal(2, fired)
    H.finish()
  end)

  it("cluster.run() waits for workers and returns after the last one is gone", function()
    local w = cluster.fork()
    w:on("online", function() w:send({ cmd = "exit", code = 5 }) end)
    local code
    w:on("exit", function(c) code = c end)
    local _, guard = run_guarded(5000)
    assert.is_false(guard)
    assert.equal(5, code)
    H.finish()
  end)

  it("cluster.stop() makes run() return true while work remains", function()
    local ticks = 0
    local t = cluster.setInterval(function()
      ticks = ticks + 1
      if ticks == 3 then cluster.stop() end
    end, 2)
    local stopped, guard = run_guarded(3000)
    cluster.clearInterval(t)
    assert.is_true(stopped)
    assert.is_false(guard)
    assert.equal(3, ticks)
    H.finish()
  end)

  it("an error raised in a callback stops run() and is re-raised there with a traceback; the loop runs again afterwards", function()
    local function callback_that_fails()
      error("boom from a callback")
    end
    cluster.setTimeout(function() callback_that_fails() end, 0)
    local after = false
    cluster.setTimeout(function() after = true end, 20)
    local ok, err = pcall(cluster.run)
    assert.is_false(ok)
    err = tostring(err)
    has(err, "boom from a callback", "stack traceback", "callback_that_fails")
    assert.is_false(after)
    -- nothing is lost: the next run goes on with the other timer
    assert.is_true(H.wait_until(function() return after end, 2000))
    H.finish()
  end)

  it("an error object raised in a callback reaches run()'s caller as the same object, its traceback in the field 'traceback'", function()
    local thrown = { code = "EDEMO", message = "demo failed" }
    local function callback_that_throws() error(thrown) end
    cluster.setTimeout(function() callback_that_throws() end, 0)
    local ok, err = pcall(cluster.run)
    assert.is_false(ok)
    assert.are.equal(thrown, err)
    assert.are.equal("EDEMO", err.code)
    has(err.traceback, "stack traceback", "callback_that_throws")
    -- one that has a traceback of its own keeps it
    local own = { traceback = "mine" }
    cluster.setTimeout(function() error(own) end, 0)
    ok, err = pcall(cluster.run)
    assert.are.equal(own, err)
    assert.are.equal("mine", err.traceback)
    H.finish()
  end)

  it("a deferred call's own deferred calls run on the next turns, without waiting for the clock", function()
    local hops, timer_fired_at = 0, nil
    local function hop()
      hops = hops + 1
      if hops < 100 then cluster.defer(hop) end
    end
    cluster.defer(hop)
    cluster.setTimeout(function() timer_fired_at = hops end, 50)
    assert.is_true(H.wait_until(function() return timer_fired_at ~= nil end, 3000))
    assert.are.equal(100, timer_fired_at) -- all 100 turns came before a 50 ms timer
    H.finish()
  end)

  it("a deferred call that raises does not lose the deferred calls queued after it", function()
    local ran = {}
    cluster.defer(function() ran[#ran + 1] = 1 end)
    cluster.defer(function() error("deferred failure") end)
    cluster.defer(function() ran[#ran + 1] = 3 end)
    cluster.defer(function() ran[#ran + 1] = 4 end)
    local ok, err
    local deadline = core.hrtime() + 2
    repeat ok, err = pcall(core.run_once) until not ok or core.hrtime() > deadline
    assert.is_false(ok)
    assert.truthy(tostring(err):find("deferred failure", 1, true))
    assert.is_true(H.wait_until(function() return #ran == 3 end, 2000))
    assert.same({ 1, 3, 4 }, ran)
    H.finish()
  end)

  it("a 'fork' listener that raises does not cost a worker that failed to start its 'exit'", function()
    cluster.setupMaster({ exec = "/nonexistent/worker.lua" })
    cluster.once("fork", function() error("fork listener failed") end)
    local w = cluster.fork()
    cluster.setupMaster({ exec = H.fixture("worker.lua") })
    local exited = false
    w:on("error", function() end)
    w:on("exit", function() exited = true end)
    local ok, err = pcall(H.wait_until, function() return exited end, 2000)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("fork listener failed", 1, true))
    assert.is_true(H.wait_until(function() return exited end, 2000))
    assert.is_nil(cluster.workers[w.id])
    H.finish()
  end)

  it("two callbacks that raise in the same turn: each error reaches a caller of the loop, none is swallowed", function()
    cluster.setTimeout(function() error("first failure") end, 0)
    cluster.setTimeout(function() error("second failure") end, 0)
    local errs = {}
    local deadline = core.hrtime() + 1
    while #errs < 2 and core.hrtime() < deadline do
      local ok, err = pcall(cluster.poll)
      if not ok then errs[#errs + 1] = tostring(err) end
    end
    assert.equal(2, #errs, "errors seen: " .. table.concat(errs, " | "))
    assert.truthy(errs[1]:find("first failure", 1, true))
    assert.truthy(errs[2]:find("second failure", 1, true))
    H.finish()
  end)

  it("an error raised in a callback during poll() is re-raised by poll()", function()
    cluster.setTimeout(function() error("boom in poll") end, 0)
    local ok, err
    local deadline = core.hrtime() + 2
    repeat
      ok, err = pcall(cluster.poll)
    until not ok or core.hrtime() > deadline
    assert.is_false(ok)
    has(tostring(err), "boom in poll", "stack traceback")
    H.finish()
  end)

  it("an error raised in a worker event listener reaches the caller of the loop too", function()
    local w = cluster.fork()
    w:on("online", function() error("listener failed") end)
    local ok, err
    local deadline = core.hrtime() + 5
    repeat
      ok, err = pcall(core.run_once)
    until not ok or core.hrtime() > deadline
    assert.is_false(ok)
    has(tostring(err), "listener failed")
    w:kill()
    H.finish()
  end)

  it("a delay counts from the call, not from the loop's clock: a timer started after a long computation (in a callback, or after poll()) waits its whole delay", function()
    local function busy(ms)
      local t0 = core.hrtime()
      while (core.hrtime() - t0) * 1000 < ms do end
    end
    local waited = {}
    local function start(tag)
      local started = core.hrtime()
      cluster.setTimeout(function() waited[tag] = (core.hrtime() - started) * 1000 end, 100)
    end
    cluster.poll()
    busy(200) -- (the loop's clock stays where poll() left it)
    start("outside")
    cluster.setTimeout(function()
      busy(200)
      start("callback")
    end, 1)
    assert.is_true(H.wait_until(function() return waited.outside and waited.callback end, 5000))
    -- (libuv counts whole milliseconds: 1 ms of rounding)
    assert.is_true(waited.outside >= 99, "fired after " .. waited.outside .. " ms")
    assert.is_true(waited.callback >= 99, "fired after " .. waited.callback .. " ms")
    H.finish()
  end)

  it("a delay below 1 ms is 1 ms, as in Node: setTimeout(a, 1) then setTimeout(b, 0) run a, b", function()
    local order = {}
    cluster.setTimeout(function() order[#order + 1] = "1ms" end, 1)
    cluster.setTimeout(function() order[#order + 1] = "0ms" end, 0)
    cluster.setTimeout(function() order[#order + 1] = "0.5ms" end, 0.5)
    assert.is_true(H.wait_until(function() return #order == 3 end, 2000))
    assert.same({ "1ms", "0ms", "0.5ms" }, order)
    H.finish()
  end)

  it("a timeout that starts itself again at 0 ms, or a deferred call that defers itself again, lets the loop go on to other timers", function()
    for _, again in ipairs { "setTimeout", "defer" } do
      local runs, stop, runs_seen = 0, false, nil
      local function chain()
        runs = runs + 1
        if stop or runs >= 10000 then return end
        if again == "defer" then cluster.defer(chain) else cluster.setTimeout(chain, 0) end
      end
      chain()
      cluster.setTimeout(function() stop, runs_seen = true, runs end, 20)
      assert.is_true(H.wait_until(function() return runs_seen ~= nil end, 5000))
      -- (held in one turn, the chain would have run to its end before the other timer)
      assert.is_true(runs_seen < 10000, again .. ": the other timer came after " .. runs_seen .. " runs")
      H.run_for(20)
    end
    H.finish()
  end)

  it("timer:unref() lets run() end without the timer, hasRef() tells, ref() undoes it", function()
    local fired = {}
    local t = cluster.setTimeout(function() fired.unrefd = true end, 60000)
    assert.is_true(t:hasRef())
    assert.equal(t, t:unref())
    assert.is_false(t:hasRef())
    local i = cluster.setInterval(function() fired.interval = true end, 60000):unref()
    local r = cluster.setTimeout(function() fired.reffed = true end, 20):unref():ref()
    assert.is_true(r:hasRef())
    local stopped, guard = run_guarded(5000)
    assert.is_false(guard)
    assert.is_false(stopped)
    assert.same({ reffed = true }, fired)
    cluster.clearTimeout(t)
    cluster.clearInterval(i)
    H.finish()
  end)

  it("cluster.stop() in a callback makes run() return; the next run() goes on with what is left", function()
    local order = {}
    cluster.setTimeout(function() order[#order + 1] = "a" cluster.stop() end, 1)
    cluster.setTimeout(function() order[#order + 1] = "b" end, 30)
    local stopped, guard = run_guarded(5000)
    assert.is_true(stopped)
    assert.is_false(guard)
    assert.same({ "a" }, order)
    stopped, guard = run_guarded(5000)
    assert.is_false(stopped)
    assert.is_false(guard)
    assert.same({ "a", "b" }, order)
    H.finish()
  end)

  it("cluster.defer raises on a callback that is not a function, naming it", function()
    has(raised(cluster.defer, nil), "defer", "callback", "nil")
    has(raised(cluster.defer, "f"), "defer", "callback", "string")
    H.finish()
  end)
end)
