--- Operational error objects: {code=, errno=, syscall=, message=} with tostring(err) == message.
-- @module cluster.errors
local M = {}

local Error = {}
Error.__index = Error
Error.__tostring = function(e) return e.message end
M.Error = Error

--- libuv's (negated) errno of EPROTO, the code of a channel that received garbage.
M.EPROTO = -71

--- Creates an error object. @tparam string code e.g. "EADDRINUSE" @tparam string syscall
-- @tparam string message @tparam[opt] table fields extra fields (address, port, path, errno)
function M.new(code, syscall, message, fields)
  local e = setmetatable({ code = code, syscall = syscall, message = message }, Error)
  if fields then for k, v in pairs(fields) do e[k] = v end end
  return e
end

--- An error object for a libuv error name (the code of luv's triple), with the
-- contract's fields; `detail` (an address, a path) goes at the end of the message.
function M.fromUv(code, syscall, detail, fields)
  local ok, e = pcall(require("cluster.core").error_object, code, syscall, detail)
  if not ok then -- not a libuv name: build the same shape in Lua
    e = M.new(code, syscall, detail and (syscall .. " " .. code .. " " .. detail) or (syscall .. " " .. code))
  end
  if fields then for k, v in pairs(fields) do e[k] = v end end
  return e
end

--- Emits 'error'(err) on an emitter, raising err when nobody listens (Node's rule),
-- unless the emitter has an `_onUnheardError(emitter, err)` to take such errors (an
-- object a worker sent: its errors are that worker's, not the master's to die of).
function M.emit(emitter, err)
  if emitter:listenerCount("error") == 0 then
    local unheard = emitter._onUnheardError
    if unheard then return unheard(emitter, err) end
    error(err, 0)
  end
  emitter:emit("error", err)
end

-- The folder of the library's modules as debug.getinfo names sources ("@.../cluster/"),
-- or nil when this module was not loaded from a file.
local LIBRARY = debug.getinfo(1, "S").source:match("^@.*[/\\]")

-- The sources of the library's chunks when they were not loaded from files (a bundle,
-- package.preload): those of the functions the loaded cluster modules hold.
local function library_sources()
  local sources = { [debug.getinfo(1, "S").source] = true }
  for name, mod in pairs(package.loaded) do
    if type(name) == "string" and (name == "cluster" or name:sub(1, 8) == "cluster.") and type(mod) == "table" then
      for _, v in pairs(mod) do
        if type(v) == "function" then sources[debug.getinfo(v, "S").source] = true end
      end
    end
  end
  return sources
end

--- Raises the message `msg` at the user's line: the first caller outside the library's
-- modules, however deep inside them the misuse was found (a C caller, such as pcall,
-- gives no position, as with Lua's own argument errors).
function M.raise(msg)
  local sources = not LIBRARY and library_sources()
  local level = 2 -- (1 is this function)
  while true do
    local info = debug.getinfo(level, "S")
    if not info then error(msg, 0) end
    local ours
    if LIBRARY then ours = info.source:sub(1, #LIBRARY) == LIBRARY else ours = sources[info.source] end
    if not ours then error(msg, level) end
    level = level + 1
  end
end

--- Raises "fname: bad argument #n (name): msg" at the user's line.
function M.argerror(fname, n, name, msg)
  M.raise(("%s: bad argument #%d (%s): %s"):format(fname, n, name, msg))
end

--- Raises "fname: bad argument #n (name): expected X, got T" at the user's line.
function M.typeerror(fname, n, name, expected, got)
  M.raise(("%s: bad argument #%d (%s): expected %s, got %s"):format(fname, n, name, expected, type(got)))
end

--- Splits a trailing callback off variable arguments (Node's optional last callback).
-- @treturn table the other arguments @treturn integer their count @return the callback or nil
function M.splitCallback(...)
  local n = select("#", ...)
  local args = { ... }
  local cb
  if n > 0 and type(args[n]) == "function" then
    cb = args[n]
    args[n] = nil
    n = n - 1
  end
  return args, n, cb
end

return M
