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

return M
