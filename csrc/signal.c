/* placeholder: being written */
#include "util.h"
void cl_open_signal(lua_State *L) { (void)L; }
