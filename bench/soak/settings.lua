-- The soak's shared settings: the addresses bench/soak/run gives the master (and its
-- workers) and the load process, from SOAK_* environment variables.
--   local settings = dofile(script_dir .. "/settings.lua")
local S = {}

--- An integer environment variable, or default.
function S.env_num(name, default)
  return math.tointeger(tonumber(os.getenv(name) or "")) or default
end

S.HOST = "127.0.0.1"
S.PORT_SUP = S.env_num("SOAK_PORT_SUP", 18901)     -- the supervised workers' TCP port
S.PORT_CHURN = S.env_num("SOAK_PORT_CHURN", 18902) -- the churn workers' TCP port
S.PORT_UDP = S.env_num("SOAK_PORT_UDP", 18903)     -- the shared UDP port
S.DIR = os.getenv("SOAK_DIR") or "/tmp"            -- where the unix paths are
S.UNIX_SUP = S.DIR .. "/sup.sock"
S.UNIX_CHURN = S.DIR .. "/churn.sock"

return S
