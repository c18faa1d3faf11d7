-- cluster.repl(): a Lua prompt served by the loop, here on a pipe (plain lines, no
-- readline): expressions and statements as lua5.4 -i evaluates them, continued lines,
-- errors that do not end it, events that run while it waits, Ctrl-C (SIGINT) dropping
-- the statement being typed, and end of input returning from it.
local core = require "cluster.core"
local H = require "helper"

describe("cluster.repl", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("evaluates what is typed while the loop runs; SIGINT drops the statement being typed; end of input returns", function()
    local fifo = H.tmpname("stdin")
    assert(os.execute("mkfifo " .. H.shell_quote(fifo)))
    local m = H.spawn_master(H.fixture("repl_master.lua"), { H.fixture("worker.lua") },
      { LUACLUSTER_NO_READLINE = "1" }, fifo)
    local input = assert(io.open(fifo, "w")) -- (the master opens it for reading meanwhile)
    local function out() return H.read_file(m.out) or "" end
    local function type_line(line) input:write(line, "\n") input:flush() end
    local function shows(text)
      return H.wait_until(function() return out():find(text, 1, true) ~= nil end, 5000), out()
    end

    assert(shows("WORKER ONLINE"))
    type_line("1 + 1")
    assert(shows("\n2\n"))
    type_line("x = 40")
    type_line("x + 2, 'two values'")
    assert(shows("42\ttwo values\n"))
    type_line("for i = 1, 2 do")
    assert(shows(">> "))
    type_line("print('loop', i) end")
    assert(shows("loop\t1\nloop\t2\n"))
    type_line("error('boom')")
    assert.is_true(H.wait_until(function() return (H.read_file(m.err) or ""):find("boom", 1, true) ~= nil end, 5000),
      "the error was not reported on stderr")
    -- a listener runs while the prompt waits for the next line
    type_line("cluster.workers[1]:on('message', function(m) print('from worker', m) end):send('hi')")
    assert(shows("from worker\thi\n"))
    -- Ctrl-C in the middle of a statement: it is dropped, the process goes on
    type_line("y = (")
    local before = #out()
    H.wait_until(function() return out():find(">> ", before - 3, true) ~= nil end, 5000)
    core.kill(m.pid, "SIGINT")
    assert.is_true(H.wait_until(function() return #out() > before end, 5000), "no fresh prompt after SIGINT")
    type_line("print('after interrupt', y)")
    assert(shows("after interrupt\tnil\n"))
    assert.is_true(H.alive(m.pid))
    assert.is_nil(out():find("unexpected symbol", 1, true), out())
    input:close() -- end of input
    assert(shows("REPL DONE"))
    assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000), "the master did not end")
    assert.equal(0, H.master_status(m), (H.read_file(m.err) or ""))
    os.remove(fifo)
    H.cleanup_master(m)
    H.finish()
  end)
end)
