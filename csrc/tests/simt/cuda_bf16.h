// cuda_bf16.h for code built by the SIMT emulator: everything it provides is in simt.h.
#pragma once
#include "simt.h"
