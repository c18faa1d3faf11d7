-- bench/http/profile's wrapper of lua_server.lua: with PROFILE_WORKER_OUT set, the master
-- starts its workers under callgrind (valgrind as the interpreter, lua5.4 as its
-- argument), writing to that file pattern. Everything else is lua_server.lua.
local cluster = require "cluster"
local out = os.getenv("PROFILE_WORKER_OUT")
if cluster.isMaster and out then
  cluster.setupMaster {
    execPath = os.getenv("VALGRIND") or "valgrind",
    execArgv = { "--tool=callgrind", "--callgrind-out-file=" .. out, os.getenv("PROFILE_LUA") or "lua5.4" },
  }
end
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "lua_server.lua")
