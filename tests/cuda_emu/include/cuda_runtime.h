/* the CPU emulator's stand-in (../cuda_compat.h) */
#include "../cuda_compat.h"
