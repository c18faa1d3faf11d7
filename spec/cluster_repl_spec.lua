-- cluster.repl(): a Lua prompt served by the loop, here on a pipe (plain lines, no
-- readline): expressions and statements as lua5.4 -i evaluates them, continued lines,
-- errors that do not end it, events that run while it waits, Ctrl-C (SIGINT) dropping
-- the statement being typed, and end of input returning from it.
local core = require "cluster.core"
local H = require "helper"

local function has_script() return os.execute("command -v script > /dev/null") end

-- Runs repl_master.lua (with one worker) on a new terminal made by script(1), whose input
-- is what press() writes. Returns keys (the input), out() (the terminal's output without
-- escape sequences and carriage returns), shows(text), press(keys), the master's and the
-- worker's pids.
local function on_terminal()
  local fifo, out_file, pid_file = H.tmpfile("tty-in"), H.tmpfile("tty-out"), H.tmpfile("tty-pid")
  assert(os.execute("mkfifo " .. H.shell_quote(fifo)))
  local command = table.concat({ "lua5.4", H.shell_quote(H.fixture("repl_master.lua")),
                                 H.shell_quote(H.fixture("worker.lua")) }, " ")
  -- (tmpfile's paths need no quoting inside the sh -c string)
  os.execute(string.format("sh -c 'echo $$ > %s; exec script -qfc \"$0\" /dev/null' %s < %s > %s 2>&1 &",
    pid_file, H.shell_quote(command), H.shell_quote(fifo), H.shell_quote(out_file)))
  local keys = assert(io.open(fifo, "w"))
  assert.is_true(H.wait_until(function() return H.track((H.read_file(pid_file) or ""):match("%d+")) ~= nil end, 5000))
  os.remove(pid_file)
  local function out() return (H.read_file(out_file) or ""):gsub("\27%[[%d;?]*%a", ""):gsub("\r", "") end
  local function shows(text) return H.wait_until(function() return out():find(text, 1, true) ~= nil end, 5000) end
  local function press(s) keys:write(s) keys:flush() end
  local master, worker
  assert.is_true(H.wait_until(function()
    master = math.tointeger(tonumber(out():match("MASTER (%d+)")))
    worker = math.tointeger(tonumber(out():match("WORKER ONLINE (%d+)")))
    return master ~= nil and worker ~= nil
  end, 5000), out())
  H.track(master)
  H.track(worker)
  return keys, out, shows, press, master, worker
end

describe("cluster.repl", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("evaluates what is typed while the loop runs; SIGINT drops the statement being typed; end of input returns", function()
    local fifo = H.tmpfile("stdin")
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
    assert.is_true(H.wait_until(function() return out():sub(-3) == ">> " end, 5000), out())
    local before = #out()
    core.kill(m.pid, "SIGINT")
    assert.is_true(H.wait_until(function() return out():find("\n> ", before, true) ~= nil end, 5000),
      "no fresh prompt after SIGINT")
    type_line("print('after interrupt', y)")
    assert(shows("after interrupt\tnil\n"))
    -- SIGINT while a statement runs interrupts it, and the REPL goes on
    type_line("while true do end")
    local interrupted = false
    for _ = 1, 10 do -- (again, in case the first came before the statement ran)
      H.run_for(100)
      core.kill(m.pid, "SIGINT")
      interrupted = H.wait_until(function() return (H.read_file(m.err) or ""):find("interrupted!", 1, true) ~= nil end, 500)
      if interrupted then break end
    end
    assert.is_true(interrupted, "the statement was not interrupted")
    type_line("print('still here')")
    assert(shows("still here\n"))
    assert.is_true(H.alive(m.pid))
    assert.is_nil(out():find("unexpected symbol", 1, true), out())
    input:close() -- end of input
    assert(shows("REPL DONE"))
    assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000), "the master did not end")
    assert.equal(0, H.master_status(m), (H.read_file(m.err) or ""))
    H.cleanup_master(m)
    H.finish()
  end)

  it("on a terminal (readline), Ctrl-C drops the statement being typed or interrupts the one running; the workers get no SIGINT", function()
    if not has_script() then
      pending("needs script(1) (bsdutils) for a terminal")
      return
    end
    local keys, out, shows, press, master, worker = on_terminal()
    press("y = (\r")
    assert.is_true(shows(">> "), out())
    press("abc")
    assert.is_true(shows(">> abc"), out())
    press("\3") -- Ctrl-C in the middle of a continued statement: a SIGINT for the master only
    -- (the terminal may echo a ^C of its own beside ours)
    assert.is_true(H.wait_until(function() return out():find("abc%^C[^\n]*\n> ") ~= nil end, 5000), out())
    press("print('after', y)\r")
    assert.is_true(shows("after\tnil\n"), out())
    -- Ctrl-C while a statement runs interrupts it (as lua5.4 -i), and the prompt comes back
    press("while true do end\r")
    assert.is_true(shows("while true do end\n"), out()) -- (readline took the line)
    local interrupted = false
    for _ = 1, 10 do -- (again, in case the first came before the statement ran)
      H.run_for(100)
      press("\3")
      interrupted = H.wait_until(function() return out():find("interrupted!", 1, true) ~= nil end, 500)
      if interrupted then break end
    end
    assert.is_true(interrupted, out())
    press("print('back')\r")
    assert.is_true(shows("back\n"), out())
    assert.is_true(H.alive(worker), "the worker got Ctrl-C's SIGINT")
    assert.is_true(H.alive(master))
    press("\4") -- Ctrl-D: the REPL returns, the master ends
    assert.is_true(shows("REPL DONE"), out())
    assert.is_true(H.wait_until(function() return not H.alive(master) and not H.alive(worker) end, 5000))
    keys:close()
    H.finish()
  end)

  it("refuses to start from a callback of the running loop (it runs the loop itself)", function()
    local cluster = require "cluster"
    local err
    cluster.setTimeout(function()
      local ok, e = pcall(cluster.repl)
      err = not ok and tostring(e) or "no error"
    end, 0)
    assert.is_true(H.wait_until(function() return err ~= nil end, 2000))
    assert.truthy(err:find("repl: called from a callback of the loop", 1, true), err)
    H.finish()
  end)

  it("on a pipe, as lua5.4 -i: '=expr', what a failing error or __tostring shows, and a statement left unfinished at end of input reported", function()
    local fifo = H.tmpfile("stdin")
    assert(os.execute("mkfifo " .. H.shell_quote(fifo)))
    local m = H.spawn_master(H.fixture("loop_repl.lua"), {}, { LUACLUSTER_NO_READLINE = "1" }, fifo)
    local input = assert(io.open(fifo, "w"))
    input:write(table.concat({
      "=1 + 1",
      "= 'a', nil",
      "error({})",
      "error(nil)",
      "setmetatable({}, { __tostring = function() error('bad tostring') end })",
      "print('goes on')",
      "for i = 1, 2 do print(i)",
    }, "\n"), "\n")
    input:close()
    assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000), "the REPL did not end")
    local out, err = H.read_file(m.out) or "", H.read_file(m.err) or ""
    assert.equal(0, H.master_status(m), err)
    for _, text in ipairs { "2\n", "a\tnil\n", "goes on\n", "REPL DONE" } do
      assert.truthy(out:find(text, 1, true), string.format("%q not in %q", text, out))
    end
    for _, text in ipairs { "(error object is a table value)", "(error object is a nil value)",
                            "error calling 'print' (stdin:1: bad tostring)", "'end' expected near <eof>" } do
      assert.truthy(err:find(text, 1, true), string.format("%q not in %q", text, err))
    end
    assert.is_nil(err:find("repl.lua", 1, true), err)
    H.cleanup_master(m)
    H.finish()
  end)

  it("on a terminal, an error raised by a callback while a line is being typed is shown above it, and the line is redrawn", function()
    if not has_script() then
      pending("needs script(1) (bsdutils) for a terminal")
      return
    end
    local keys, out, shows, press, master, worker = on_terminal()
    press("cluster.setTimeout(function() error('late failure') end, 300)\r")
    assert.is_true(shows("table: "), out())
    press("abc")
    assert.is_true(shows("stdin:1: late failure"), out())
    -- the prompt and the line being typed come back under the error
    assert.is_true(H.wait_until(function() return out():find("stdin:1: late failure.*\n> abc$") ~= nil end, 5000), out())
    assert.is_nil(out():find("repl.lua", 1, true), out())
    press("\21print('typed')\r") -- (Ctrl-U: the line is dropped)
    assert.is_true(shows("typed\n"), out())
    press("\4")
    assert.is_true(shows("REPL DONE"), out())
    assert.is_true(H.wait_until(function() return not H.alive(master) and not H.alive(worker) end, 5000))
    keys:close()
    H.finish()
  end)
end)
