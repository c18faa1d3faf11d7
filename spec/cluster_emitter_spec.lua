-- Events on cluster and on workers (Node's EventEmitter semantics): order, once, off,
-- chaining, changes while an event is being emitted, argument errors.
local cluster = require "cluster"
local Emitter = require "cluster.emitter"
local H = require "helper"

describe("cluster events", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("calls listeners in the order they were added, with the event's arguments", function()
    local e = Emitter.new()
    local calls = {}
    e:on("x", function(...) calls[#calls + 1] = { "first", ... } end)
    e:on("x", function(...) calls[#calls + 1] = { "second", ... } end)
    assert.is_true(e:emit("x", 1, nil, "three"))
    assert.is_false(e:emit("nobody-listens"))
    assert.same({ { "first", 1, nil, "three" }, { "second", 1, nil, "three" } }, calls)
    H.finish()
  end)

  it("on returns the emitter so calls chain, with a dot on cluster and a colon on workers", function()
    local n = 0
    local f = function() n = n + 1 end
    assert.equal(cluster, cluster.on("spec-a", f).on("spec-b", f))
    assert.equal(cluster, cluster:on("spec-c", f))
    cluster.emit("spec-a")
    cluster:emit("spec-b")
    cluster.emit("spec-c")
    assert.equal(3, n)
    assert.equal(1, cluster.listenerCount("spec-a"))
    cluster.off("spec-a", f)
    assert.equal(0, cluster.listenerCount("spec-a"))
    H.finish()
  end)

  it("once runs a listener one time, and off removes it by the function given to once", function()
    local e = Emitter.new()
    local n, m = 0, 0
    e:once("x", function() n = n + 1 end)
    e:emit("x")
    e:emit("x")
    assert.equal(1, n)
    local f = function() m = m + 1 end
    e:once("y", f)
    assert.equal(1, e:listenerCount("y"))
    e:off("y", f)
    assert.equal(0, e:listenerCount("y"))
    e:emit("y")
    assert.equal(0, m)
    H.finish()
  end)

  it("a listener added during an emit runs from the next emit; one removed during an emit still runs in that emit", function()
    local e = Emitter.new()
    local calls = {}
    local late = function() calls[#calls + 1] = "late" end
    local b = function() calls[#calls + 1] = "b" end
    e:on("x", function()
      calls[#calls + 1] = "a"
      if #calls == 1 then
        e:on("x", late)
        e:off("x", b)
      end
    end)
    e:on("x", b)
    e:emit("x")
    e:emit("x")
    assert.same({ "a", "b", "a", "late" }, calls)
    H.finish()
  end)

  it("off with no function removes every listener of the event; removeAllListeners removes all", function()
    local e = Emitter.new()
    local f = function() error("must not run") end
    e:on("x", f):on("x", f):on("y", f)
    e:off("x")
    assert.equal(0, e:listenerCount("x"))
    assert.equal(1, e:listenerCount("y"))
    e:removeAllListeners()
    assert.equal(0, e:listenerCount("y"))
    e:emit("x")
    e:emit("y")
    H.finish()
  end)

  it("removeAllListeners() tells the emitter's remove hook of every event it empties, as off does", function()
    local e = Emitter.new()
    local removed = {}
    e._onRemoveListener = function(_, name) removed[#removed + 1] = name end
    e:on("x", print):on("x", print):on("y", print)
    e:removeAllListeners()
    table.sort(removed)
    assert.same({ "x", "y" }, removed)
    assert.equal(0, e:listenerCount("x") + e:listenerCount("y"))
    e:removeAllListeners() -- nothing left: nothing to tell
    assert.equal(2, #removed)
    e:on("z", print) -- still an emitter
    assert.equal(1, e:listenerCount("z"))
    H.finish()
  end)

  it("signals as events: an unknown SIG name is a plain event (as Node); a signal that cannot be watched raises and keeps no listener", function()
    local got
    cluster.on("SIGNOTASIGNAL", function(v) got = v end)
    cluster.emit("SIGNOTASIGNAL", 7)
    assert.equal(7, got)
    cluster.off("SIGNOTASIGNAL")
    local ok, err = pcall(function() cluster.on("SIGKILL", print) end)
    assert.is_false(ok)
    assert.matches("^spec/cluster_emitter_spec.lua:%d+: cluster.on: bad argument #1 %(event name%): cannot watch SIGKILL", tostring(err))
    assert.equal(0, cluster.listenerCount("SIGKILL"))
    H.finish()
  end)

  it("a worker's once('exit') listener runs once and the worker's off() works on real events", function()
    cluster.setupMaster { exec = H.fixture("worker.lua") }
    local w = cluster.fork()
    local removed = H.expect(nil, 0)
    w:on("online", removed)
    w:off("online", removed)
    w:once("online", H.expect(function() w:kill() end))
    w:once("exit", H.expect())
    assert.is_true(H.wait_until(function() return w:isDead() and not w:isConnected() end, 5000))
    H.finish()
  end)

  it("raises on a non-string event name or a non-function listener, naming the method", function()
    local e = Emitter.new()
    local ok, err = pcall(e.on, e, 1, print)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("on: bad argument #1 (event name)", 1, true))
    ok, err = pcall(e.once, e, "x", {})
    assert.is_false(ok)
    assert.truthy(tostring(err):find("once: bad argument #2 (listener)", 1, true))
    H.finish()
  end)

  it("off removes, of a listener added more than once, the one added last (Node's order)", function()
    local e = Emitter.new()
    local calls = {}
    local f = function() calls[#calls + 1] = "f" end
    local g = function() calls[#calls + 1] = "g" end
    e:on("x", f):on("x", g):on("x", f)
    e:off("x", f)
    e:emit("x")
    assert.same({ "f", "g" }, calls)
    -- on(f) then once(f): off(f) removes the once, so f stays for every emit
    local n = 0
    local h = function() n = n + 1 end
    e:on("y", h):once("y", h):off("y", h)
    e:emit("y")
    e:emit("y")
    assert.equal(2, n)
    H.finish()
  end)

  it("a once listener fired by a nested emit is not called again by the emit that began before it", function()
    local e = Emitter.new()
    local calls = {}
    local nested = false
    e:on("x", function()
      calls[#calls + 1] = "a"
      if not nested then
        nested = true
        e:emit("x")
      end
    end)
    e:once("x", function() calls[#calls + 1] = "once" end)
    e:emit("x")
    assert.same({ "a", "a", "once" }, calls)
    H.finish()
  end)

  it("'error' with no listener raises its argument (Node throws); with a listener, the listener gets it", function()
    local e = Emitter.new()
    local err = { code = "EX" }
    local ok, raised = pcall(e.emit, e, "error", err)
    assert.is_false(ok)
    assert.equal(err, raised)
    ok, raised = pcall(e.emit, e, "error")
    assert.is_false(ok)
    assert.equal("ERR_UNHANDLED_ERROR", raised.code)
    local got
    e:once("error", function(x) got = x end)
    assert.is_true(e:emit("error", err))
    assert.equal(err, got)
    assert.is_false(pcall(e.emit, e, "error", err)) -- (the once listener is gone)
    H.finish()
  end)

  it("listeners() gives a copy of an event's listeners in order, once listeners as given", function()
    local e = Emitter.new()
    local f, g = function() end, function() end
    assert.same({}, e:listeners("x"))
    e:on("x", f)
    assert.same({ f }, e:listeners("x"))
    e:once("x", g)
    local list = e:listeners("x")
    assert.same({ f, g }, list)
    list[1] = nil
    assert.equal(2, e:listenerCount("x"))
    -- on the cluster module, with a dot as its other emitter functions
    local cluster = require "cluster"
    cluster.on("luacluster-test-event", f)
    assert.same({ f }, cluster.listeners("luacluster-test-event"))
    cluster.off("luacluster-test-event", f)
    H.finish()
  end)

  it("off and removeAllListeners raise on a bad event name or listener, naming the method", function()
    local e = Emitter.new()
    local ok, err = pcall(e.off, e, "x", 42)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("off: bad argument #2 (listener)", 1, true), tostring(err))
    ok, err = pcall(e.off, e, {}, print)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("off: bad argument #1 (event name)", 1, true), tostring(err))
    ok, err = pcall(e.removeAllListeners, e, 7)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("removeAllListeners: bad argument #1 (event name)", 1, true), tostring(err))
    H.finish()
  end)
end)
