/* placeholder: being written */
#include "util.h"
void cl_open_udp(lua_State *L) { (void)L; }
