// Command aqsh-interop drives the real Go asynq library against a Redis that aqsh also uses.
// The Python interop tests run it as a subprocess; every subcommand prints JSON on stdout.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: aqsh-interop <command> [flags]")
	}
	cmd, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	uri := fs.String("redis", "redis://127.0.0.1:6379/0", "redis URI")
	queue := fs.String("queue", "default", "queue name")
	state := fs.String("state", "pending", "task state")
	id := fs.String("id", "", "task id")
	op := fs.String("op", "", "mutation")
	queues := fs.String("queues", "default:1", "queues for serve, name:weight,...")
	concurrency := fs.Int("concurrency", 10, "server concurrency")
	duration := fs.Duration("duration", 10*time.Second, "how long to serve")
	n := fs.Int("n", 1000, "number of tasks")
	out := fs.String("out", "", "output directory")
	groupGrace := fs.Duration("group-grace", 0, "serve: aggregate groups with this grace period (0 = no aggregator)")
	groupMaxSize := fs.Int("group-max-size", 0, "serve: GroupMaxSize")
	groupMaxDelay := fs.Duration("group-max-delay", 0, "serve: GroupMaxDelay")
	if err := fs.Parse(args); err != nil {
		fail(err.Error())
	}
	opt, err := asynq.ParseRedisURI(*uri)
	if err != nil {
		fail(err.Error())
	}
	switch cmd {
	case "enqueue":
		enqueue(opt)
	case "inspect":
		inspect(opt, *queue, *id)
	case "list":
		list(opt, *queue, *state)
	case "queue-info":
		queueInfo(opt, *queue)
	case "queues":
		withInspector(opt, func(i *asynq.Inspector) any { return must(i.Queues()) })
	case "history":
		withInspector(opt, func(i *asynq.Inspector) any { return must(i.History(*queue, 3)) })
	case "groups":
		withInspector(opt, func(i *asynq.Inspector) any {
			out := map[string]int{}
			for _, g := range must(i.Groups(*queue)) {
				out[g.Group] = g.Size
			}
			return out
		})
	case "servers":
		servers(opt)
	case "cron":
		withInspector(opt, schedulerEntries)
	case "mutate":
		mutate(opt, *op, *queue, *id)
	case "serve":
		serve(opt, parseQueues(*queues), *concurrency, *duration,
			groupConfig{*groupGrace, *groupMaxSize, *groupMaxDelay})
	case "golden":
		golden(opt, *out)
	case "bench-enqueue":
		benchEnqueue(opt, *n, *concurrency)
	case "bench-process":
		benchProcess(opt, *queue, *n, *concurrency)
	case "bench-pickup":
		benchPickup(opt, *n)
	default:
		fail("unknown command " + cmd)
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, msg)
	os.Exit(2)
}

func must[T any](v T, err error) T {
	if err != nil {
		fail(err.Error())
	}
	return v
}

func emit(v any) {
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(v); err != nil {
		fail(err.Error())
	}
}

func redisClient(opt asynq.RedisConnOpt) redis.UniversalClient {
	return opt.MakeRedisClient().(redis.UniversalClient)
}

// EnqueueSpec is one task to enqueue with the Go client (fields mirror asynq's options).
type EnqueueSpec struct {
	Type       string            `json:"type"`
	Payload    string            `json:"payload"`
	Headers    map[string]string `json:"headers"`
	Queue      string            `json:"queue"`
	MaxRetry   *int              `json:"max_retry"`
	TaskID     string            `json:"task_id"`
	TimeoutS   int               `json:"timeout_s"`
	DeadlineS  int64             `json:"deadline_s"`
	UniqueS    int               `json:"unique_s"`
	ProcessInS int               `json:"process_in_s"`
	RetentionS int               `json:"retention_s"`
	Group      string            `json:"group"`
}

func enqueue(opt asynq.RedisConnOpt) {
	var specs []EnqueueSpec
	if err := json.NewDecoder(os.Stdin).Decode(&specs); err != nil {
		fail(err.Error())
	}
	client := asynq.NewClient(opt)
	defer client.Close()
	results := []map[string]any{}
	for _, s := range specs {
		var opts []asynq.Option
		if s.Queue != "" {
			opts = append(opts, asynq.Queue(s.Queue))
		}
		if s.MaxRetry != nil {
			opts = append(opts, asynq.MaxRetry(*s.MaxRetry))
		}
		if s.TaskID != "" {
			opts = append(opts, asynq.TaskID(s.TaskID))
		}
		if s.TimeoutS > 0 {
			opts = append(opts, asynq.Timeout(time.Duration(s.TimeoutS)*time.Second))
		}
		if s.DeadlineS > 0 {
			opts = append(opts, asynq.Deadline(time.Unix(s.DeadlineS, 0)))
		}
		if s.UniqueS > 0 {
			opts = append(opts, asynq.Unique(time.Duration(s.UniqueS)*time.Second))
		}
		if s.ProcessInS > 0 {
			opts = append(opts, asynq.ProcessIn(time.Duration(s.ProcessInS)*time.Second))
		}
		if s.RetentionS > 0 {
			opts = append(opts, asynq.Retention(time.Duration(s.RetentionS)*time.Second))
		}
		if s.Group != "" {
			opts = append(opts, asynq.Group(s.Group))
		}
		task := asynq.NewTaskWithHeaders(s.Type, []byte(s.Payload), s.Headers, opts...)
		info, err := client.Enqueue(task)
		if err != nil {
			results = append(results, map[string]any{"error": err.Error()})
			continue
		}
		results = append(results, map[string]any{"id": info.ID, "queue": info.Queue, "state": info.State.String()})
	}
	emit(results)
}

func taskJSON(t *asynq.TaskInfo) map[string]any {
	unix := func(tm time.Time) int64 {
		if tm.IsZero() {
			return 0
		}
		return tm.Unix()
	}
	return map[string]any{
		"id": t.ID, "queue": t.Queue, "type": t.Type, "payload": string(t.Payload), "payload_b64": t.Payload,
		"headers": t.Headers, "state": t.State.String(), "max_retry": t.MaxRetry,
		"retried": t.Retried, "last_err": t.LastErr, "last_failed_at": unix(t.LastFailedAt),
		"timeout_s": int64(t.Timeout / time.Second), "deadline": unix(t.Deadline),
		"group": t.Group, "next_process_at": unix(t.NextProcessAt), "is_orphaned": t.IsOrphaned,
		"retention_s": int64(t.Retention / time.Second), "completed_at": unix(t.CompletedAt),
		"result": string(t.Result),
	}
}

func withInspector(opt asynq.RedisConnOpt, f func(*asynq.Inspector) any) {
	insp := asynq.NewInspector(opt)
	defer insp.Close()
	emit(f(insp))
}

func inspect(opt asynq.RedisConnOpt, queue, id string) {
	withInspector(opt, func(i *asynq.Inspector) any {
		info, err := i.GetTaskInfo(queue, id)
		if err != nil {
			return map[string]any{"error": err.Error()}
		}
		return taskJSON(info)
	})
}

func list(opt asynq.RedisConnOpt, queue, state string) {
	withInspector(opt, func(i *asynq.Inspector) any {
		var tasks []*asynq.TaskInfo
		var err error
		page := asynq.PageSize(1000)
		switch state {
		case "pending":
			tasks, err = i.ListPendingTasks(queue, page)
		case "active":
			tasks, err = i.ListActiveTasks(queue, page)
		case "scheduled":
			tasks, err = i.ListScheduledTasks(queue, page)
		case "retry":
			tasks, err = i.ListRetryTasks(queue, page)
		case "archived":
			tasks, err = i.ListArchivedTasks(queue, page)
		case "completed":
			tasks, err = i.ListCompletedTasks(queue, page)
		default:
			fail("unknown state " + state)
		}
		if err != nil {
			return map[string]any{"error": err.Error()}
		}
		out := []map[string]any{}
		for _, t := range tasks {
			out = append(out, taskJSON(t))
		}
		return out
	})
}

func queueInfo(opt asynq.RedisConnOpt, queue string) {
	withInspector(opt, func(i *asynq.Inspector) any {
		q, err := i.GetQueueInfo(queue)
		if err != nil {
			return map[string]any{"error": err.Error()}
		}
		return map[string]any{
			"queue": q.Queue, "size": q.Size, "pending": q.Pending, "active": q.Active,
			"scheduled": q.Scheduled, "retry": q.Retry, "archived": q.Archived,
			"completed": q.Completed, "aggregating": q.Aggregating, "processed": q.Processed,
			"failed": q.Failed, "processed_total": q.ProcessedTotal, "failed_total": q.FailedTotal,
			"paused": q.Paused, "latency_s": q.Latency.Seconds(), "memory": q.MemoryUsage,
			"groups": q.Groups,
		}
	})
}

func servers(opt asynq.RedisConnOpt) {
	withInspector(opt, func(i *asynq.Inspector) any {
		list, err := i.Servers()
		if err != nil {
			return map[string]any{"error": err.Error()}
		}
		out := []map[string]any{}
		for _, s := range list {
			workers := []map[string]any{}
			for _, w := range s.ActiveWorkers {
				workers = append(workers, map[string]any{
					"task_id": w.TaskID, "type": w.TaskType, "payload": string(w.TaskPayload),
					"queue": w.Queue, "started": w.Started.Unix(), "deadline": w.Deadline.Unix(),
				})
			}
			out = append(out, map[string]any{
				"id": s.ID, "host": s.Host, "pid": s.PID, "concurrency": s.Concurrency,
				"queues": s.Queues, "strict": s.StrictPriority, "status": s.Status,
				"started": s.Started.Unix(), "workers": workers,
			})
		}
		return out
	})
}

// schedulerEntries is what `asynq cron ls` and `asynq cron history` show, and Asynqmon's
// scheduler page: every entry with its parsed options and its enqueue events.
func schedulerEntries(i *asynq.Inspector) any {
	entries, err := i.SchedulerEntries()
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	out := []map[string]any{}
	for _, e := range entries {
		opts := []string{}
		for _, o := range e.Opts {
			opts = append(opts, o.String())
		}
		events := []map[string]any{}
		list, err := i.ListSchedulerEnqueueEvents(e.ID)
		if err != nil {
			return map[string]any{"error": err.Error()}
		}
		for _, ev := range list {
			events = append(events, map[string]any{"task_id": ev.TaskID, "at": ev.EnqueuedAt.Unix()})
		}
		out = append(out, map[string]any{
			"id": e.ID, "spec": e.Spec, "type": e.Task.Type(), "payload": string(e.Task.Payload()),
			"opts": opts, "next": e.Next.Unix(), "prev_zero": e.Prev.IsZero(),
			"prev": e.Prev.Unix(), "events": events,
		})
	}
	return out
}

func mutate(opt asynq.RedisConnOpt, op, queue, id string) {
	withInspector(opt, func(i *asynq.Inspector) any {
		var err error
		switch op {
		case "run":
			err = i.RunTask(queue, id)
		case "delete":
			err = i.DeleteTask(queue, id)
		case "archive":
			err = i.ArchiveTask(queue, id)
		case "pause":
			err = i.PauseQueue(queue)
		case "unpause":
			err = i.UnpauseQueue(queue)
		case "cancel":
			err = i.CancelProcessing(id)
		default:
			fail("unknown op " + op)
		}
		if err != nil {
			return map[string]any{"error": err.Error()}
		}
		return map[string]any{"ok": true}
	})
}

func parseQueues(spec string) map[string]int {
	out := map[string]int{}
	for _, part := range strings.Split(spec, ",") {
		name, weight := part, 1
		if idx := strings.LastIndex(part, ":"); idx > 0 {
			name = part[:idx]
			fmt.Sscanf(part[idx+1:], "%d", &weight)
		}
		out[name] = weight
	}
	return out
}

// groupConfig is the server's group aggregation; a zero grace period means no aggregator.
type groupConfig struct {
	grace    time.Duration
	maxSize  int
	maxDelay time.Duration
}

// serve runs a Go asynq.Server whose handlers record what they saw in the Redis list
// "interop:seen". Task types choose the behaviour: "ok*" succeed, "fail*" return an error,
// "sleep:<ms>" sleep then succeed, "result*" write a result, "skip*" skip retry. With a group
// grace period, groups aggregate into one "batch:<group>" task whose payload is the tasks'
// payloads joined by "," in the order the aggregator got them.
func serve(opt asynq.RedisConnOpt, queues map[string]int, concurrency int, duration time.Duration, groups groupConfig) {
	rdb := redisClient(opt)
	cfg := asynq.Config{
		Concurrency: concurrency,
		Queues:      queues,
		RetryDelayFunc: func(n int, e error, t *asynq.Task) time.Duration {
			return time.Second
		},
		ShutdownTimeout: 5 * time.Second,
		LogLevel:        asynq.WarnLevel,
	}
	if groups.grace > 0 {
		cfg.GroupGracePeriod = groups.grace
		cfg.GroupMaxSize = groups.maxSize
		cfg.GroupMaxDelay = groups.maxDelay
		cfg.GroupAggregator = asynq.GroupAggregatorFunc(func(group string, tasks []*asynq.Task) *asynq.Task {
			parts := make([]string, len(tasks))
			for i, t := range tasks {
				parts[i] = string(t.Payload())
			}
			return asynq.NewTask("batch:"+group, []byte(strings.Join(parts, ",")), asynq.MaxRetry(0))
		})
	}
	srv := asynq.NewServer(opt, cfg)
	handler := asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
		id, _ := asynq.GetTaskID(ctx)
		retried, _ := asynq.GetRetryCount(ctx)
		record, _ := json.Marshal(map[string]any{
			"id": id, "type": t.Type(), "payload": string(t.Payload()), "headers": t.Headers(),
			"retried": retried, "server": "go",
		})
		typ := t.Type()
		if strings.HasPrefix(typ, "sleep:") {
			var ms int
			fmt.Sscanf(typ[len("sleep:"):], "%d", &ms)
			select {
			case <-time.After(time.Duration(ms) * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		rdb.RPush(context.Background(), "interop:seen", record)
		switch {
		case strings.HasPrefix(typ, "fail"):
			return errors.New("go handler failed")
		case strings.HasPrefix(typ, "skip"):
			return fmt.Errorf("skip: %w", asynq.SkipRetry)
		case strings.HasPrefix(typ, "result"):
			_, err := t.ResultWriter().Write([]byte("go-result:" + string(t.Payload())))
			return err
		}
		return nil
	})
	if err := srv.Start(handler); err != nil {
		fail(err.Error())
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-time.After(duration):
	case <-sig:
	}
	srv.Shutdown()
	emit(map[string]any{"ok": true})
}
