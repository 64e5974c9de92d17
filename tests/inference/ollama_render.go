// Renders an Ollama Modelfile TEMPLATE with Go's text/template, the engine Ollama renders prompts
// with, over the data Ollama gives a chat request (after its collate step, ported below): .System
// (the system messages joined by blank lines), .Messages (.Role, .Content; consecutive messages of
// one role merged), .Prompt and .Response (empty for chat).
// Input on stdin: {"template": "...", "messages": [{"role": "...", "content": "..."}]}; output: the prompt.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func main() {
	var req Request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	// Ollama's collate: consecutive messages of one role are merged with a blank line between them,
	// and .System joins the system messages.
	var msgs []Message
	var system []string
	for _, m := range req.Messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(msgs); n > 0 && msgs[n-1].Role == m.Role {
			msgs[n-1].Content += "\n\n" + m.Content
			continue
		}
		msgs = append(msgs, m)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(3)
	}
	data := map[string]any{
		"System":   strings.Join(system, "\n\n"),
		"Messages": msgs,
		"Prompt":   "",
		"Response": "",
	}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(4)
	}
}
