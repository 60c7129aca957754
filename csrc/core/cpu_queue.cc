#include "cpu_queue.h"

#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "error.h"

namespace sqz {
namespace {

struct Queue {
  std::mutex m;
  std::condition_variable cv, done_cv;
  std::deque<std::pair<uint64_t, std::function<void()>>> tasks;
  uint64_t issued = 0, completed = 0;
  std::exception_ptr error;
  std::thread worker;

  Queue() { worker = std::thread([this] { loop(); }); worker.detach(); }

  void loop() {
    for (;;) {
      std::pair<uint64_t, std::function<void()>> job;
      {
        std::unique_lock<std::mutex> lk(m);
        cv.wait(lk, [&] { return !tasks.empty(); });
        job = std::move(tasks.front());
        tasks.pop_front();
      }
      std::exception_ptr err;
      try {
        job.second();
      } catch (...) {
        err = std::current_exception();
      }
      job.second = nullptr;  // release captured tensors before reporting completion
      {
        std::lock_guard<std::mutex> lk(m);
        if (err && !error) error = err;
        completed = job.first;
      }
      done_cv.notify_all();
    }
  }
};

Queue& queue() {
  static Queue* q = new Queue();  // leaked: a detached worker must never see it destroyed
  return *q;
}

}  // namespace

uint64_t cpu_enqueue(std::function<void()> task) {
  Queue& q = queue();
  uint64_t t;
  {
    std::lock_guard<std::mutex> lk(q.m);
    t = ++q.issued;
    q.tasks.emplace_back(t, std::move(task));
  }
  q.cv.notify_one();
  return t;
}

uint64_t cpu_last_ticket() {
  Queue& q = queue();
  std::lock_guard<std::mutex> lk(q.m);
  return q.issued;
}

void cpu_wait(uint64_t ticket) {
  Queue& q = queue();
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lk(q.m);
    q.done_cv.wait(lk, [&] { return q.completed >= ticket; });
    err = q.error;
    q.error = nullptr;
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace sqz
