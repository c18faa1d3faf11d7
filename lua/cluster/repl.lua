--- cluster.repl(): an interactive Lua prompt served by the loop. Workers, sockets,
-- timers and events keep running while the user types. Statements and expressions are
-- evaluated as lua5.4 -i does; errors are reported and the prompt goes on; end of input
-- (Ctrl-D) returns from repl().
-- @module cluster.repl
local core = require "cluster.core"
local errors = require "cluster.errors"

local M = {}

-- An error's text as lua.c shows it: a string, or what __tostring gives, or its type.
local function error_text(err)
  if type(err) == "string" then return err end
  local mt = getmetatable(err)
  if type(mt) == "table" and mt.__tostring then
    local ok, text = pcall(tostring, err)
    if ok and type(text) == "string" then return text end
  end
  return "(error object is a " .. type(err) .. " value)"
end

local function report(msg)
  -- drop the frames of the REPL itself from tracebacks (those under the statement, or
  -- under the callback that failed)
  msg = error_text(msg):gsub("\n\t%[C%]: in function '[^']*call_interruptible'.*$", "")
    :gsub("\n\t%[C%]: in function 'cluster%.core%.run'.*$", "")
  io.stderr:write(msg, "\n")
  io.stderr:flush()
end

local function results_text(n, ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  return table.concat(parts, "\t")
end

-- (a value whose __tostring fails is reported as lua.c does, and the prompt goes on)
local function print_results(n, ...)
  if n == 0 then return end
  local ok, text = pcall(results_text, n, ...)
  if not ok then return report("error calling 'print' (" .. error_text(text) .. ")") end
  io.stdout:write(text, "\n")
  io.stdout:flush()
end

-- Compiles a chunk the way lua.c does: first as an expression, then as a statement.
-- Returns fn, or nil and "incomplete", or nil and an error message.
local function compile(source, env)
  local fn = load("return " .. source, "=stdin", "t", env)
  if fn then return fn end
  local err
  fn, err = load(source, "=stdin", "t", env)
  if fn then return fn end
  if err:sub(-5) == "<eof>" then return nil, "incomplete" end
  return nil, err
end

--- Starts the prompt and runs the loop until end of input.
-- @tparam table cluster the cluster module
-- @tparam[opt] table options {prompt=, prompt2=, env=}
function M.start(cluster, options)
  options = options or {}
  if type(options) ~= "table" then
    errors.raise("repl: bad argument #1 (options): expected a table, got " .. type(options))
  end
  if core.loop_running() then
    errors.raise("repl: called from a callback of the loop; call it from the main script")
  end
  local prompt, prompt2 = options.prompt or "> ", options.prompt2 or ">> "
  local env = options.env or setmetatable({ cluster = cluster }, { __index = _G, __newindex = _G })
  local buffer = nil
  local done = false

  local function on_line(line)
    if line == nil then
      done = true
      io.stdout:write("\n")
      io.stdout:flush()
      -- a statement left unfinished is not dropped silently ("'end' expected near <eof>")
      if buffer then report(select(2, load(buffer, "=stdin", "t", env))) end
      core.stop()
      return
    end
    -- "=expr" on a first line is "return expr", as in lua5.4 -i
    if not buffer and line:sub(1, 1) == "=" then line = "return " .. line:sub(2) end
    local source = buffer and (buffer .. "\n" .. line) or line
    local fn, err = compile(source, env)
    if not fn and err == "incomplete" then
      buffer = source
      core.readline_prompt(prompt2)
      return
    end
    buffer = nil
    if fn then
      -- (Ctrl-C while it runs makes it fail with "interrupted!", as in lua5.4 -i)
      local results = table.pack(core.call_interruptible(fn))
      if results[1] then
        print_results(results.n - 1, table.unpack(results, 2, results.n))
      else
        report(results[2])
      end
    else
      report(err)
    end
    core.readline_prompt(prompt)
  end

  -- output from listeners while the user types: clear the edited line, print, redraw
  local plain_print = print
  print = function(...)
    core.readline_hide()
    plain_print(...)
    core.readline_show()
  end

  -- Ctrl-C (SIGINT) at the prompt drops the statement being typed (a continued one too)
  -- and shows a fresh prompt; it does not end the process while the prompt is up. (The
  -- workers run in process groups of their own: the terminal's Ctrl-C reaches the master only.)
  local interrupt = core.signal("SIGINT", function()
    buffer = nil
    core.readline_cancel(prompt)
  end)
  if interrupt then interrupt:unref() end

  core.readline_start(prompt, on_line)
  while not done do
    local ok, err = pcall(core.run)
    if not ok then
      -- an error in a callback: show it and keep the prompt (and the line being typed)
      core.readline_hide()
      report(err)
      core.readline_show()
    elseif not done and not core.alive() then
      break
    end
  end
  core.readline_stop()
  if interrupt then interrupt:close() end
  print = plain_print
end

return M
