// The CPU "stream": ops on CPU tensors are queued here and run in order on one worker
// thread (which fans out through parallel_for), so a long CPU forward never blocks the
// JS event loop. Reading a result waits for the ticket of the last queued task.
#pragma once
#include <cstdint>
#include <functional>

namespace sqz {

// Queues a task; returns its ticket. Tasks run in submission order.
uint64_t cpu_enqueue(std::function<void()> task);
// Ticket of the most recently queued task (0 if none yet).
uint64_t cpu_last_ticket();
// Blocks until every task up to `ticket` has run. Throws the first error a task raised
// since the last wait (then clears it), so a failure surfaces where results are read.
void cpu_wait(uint64_t ticket);

}  // namespace sqz
