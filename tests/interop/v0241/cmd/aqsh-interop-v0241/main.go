// Command aqsh-interop-v0241 reads aqsh's Redis data with asynq v0.24.1, the version Asynqmon
// pins, to prove the Web UI can show aqsh queues.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/hibiken/asynq"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: aqsh-interop-v0241 <queue-info|list> [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	uri := fs.String("redis", "redis://127.0.0.1:6379/0", "redis URI")
	queue := fs.String("queue", "default", "queue")
	state := fs.String("state", "pending", "state")
	_ = fs.Parse(os.Args[2:])
	opt, err := asynq.ParseRedisURI(*uri)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	insp := asynq.NewInspector(opt)
	defer insp.Close()
	var out any
	switch os.Args[1] {
	case "queue-info":
		q, err := insp.GetQueueInfo(*queue)
		if err != nil {
			out = map[string]any{"error": err.Error()}
			break
		}
		out = map[string]any{"size": q.Size, "pending": q.Pending, "scheduled": q.Scheduled,
			"active": q.Active, "memory": q.MemoryUsage, "latency_s": q.Latency.Seconds()}
	case "list":
		var tasks []*asynq.TaskInfo
		switch *state {
		case "pending":
			tasks, err = insp.ListPendingTasks(*queue)
		case "scheduled":
			tasks, err = insp.ListScheduledTasks(*queue)
		case "completed":
			tasks, err = insp.ListCompletedTasks(*queue)
		case "archived":
			tasks, err = insp.ListArchivedTasks(*queue)
		}
		if err != nil {
			out = map[string]any{"error": err.Error()}
			break
		}
		list := []map[string]any{}
		for _, t := range tasks {
			list = append(list, map[string]any{"id": t.ID, "type": t.Type, "state": t.State.String(),
				"next_process_at": t.NextProcessAt.Unix(), "retention_s": int64(t.Retention / time.Second)})
		}
		out = list
	case "cron":
		entries, err := insp.SchedulerEntries()
		if err != nil {
			out = map[string]any{"error": err.Error()}
			break
		}
		list := []map[string]any{}
		for _, e := range entries {
			opts := []string{}
			for _, o := range e.Opts {
				opts = append(opts, o.String())
			}
			events, err := insp.ListSchedulerEnqueueEvents(e.ID)
			if err != nil {
				out = map[string]any{"error": err.Error()}
				break
			}
			list = append(list, map[string]any{"id": e.ID, "spec": e.Spec, "type": e.Task.Type(),
				"opts": opts, "next": e.Next.Unix(), "prev_zero": e.Prev.IsZero(),
				"events": len(events)})
		}
		out = list
	default:
		fmt.Fprintln(os.Stderr, "unknown command")
		os.Exit(2)
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}
