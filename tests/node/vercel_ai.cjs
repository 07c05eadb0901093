// The Vercel AI SDK's default OpenAI provider (which speaks the Responses API) with
// streamText against tokenrelay. Usage: node vercel_ai.cjs <baseURL> <model> [tools].
// Prints one JSON line.
const { createOpenAI } = require("@ai-sdk/openai");
const { streamText, tool } = require("ai");
const { z } = require("zod");

async function main() {
  const [baseURL, model, mode] = process.argv.slice(2);
  const provider = createOpenAI({ baseURL, apiKey: "unused" });
  const options = { model: provider(model), prompt: "What is SSE?", maxRetries: 0 };
  if (mode === "tools") {
    options.prompt = "Weather in two cities?";
    options.tools = {
      get_weather: tool({
        description: "Current weather of a city",
        inputSchema: z.object({ city: z.string() }),
      }),
    };
  }
  const errors = [];
  const result = streamText({ ...options, onError: ({ error }) => errors.push(String(error)) });
  let text = "";
  for await (const delta of result.textStream) text += delta;
  if (mode === "multiturn") {
    // A second turn: the SDK sends the first answer back (as an item_reference, since
    // store is on by default) and the next question.
    const earlier = (await result.response).messages;
    const next = streamText({
      model: provider(model), maxRetries: 0, onError: ({ error }) => errors.push(String(error)),
      messages: [{ role: "user", content: options.prompt }, ...earlier,
                 { role: "user", content: "And tomorrow?" }],
    });
    let second = "";
    for await (const delta of next.textStream) second += delta;
    console.log(JSON.stringify({ first: text, second, errors,
                                 finishReason: await next.finishReason }));
    return;
  }
  const toolCalls = (await result.toolCalls).map((c) => ({ name: c.toolName, input: c.input }));
  console.log(JSON.stringify({
    text,
    reasoning: (await result.reasoningText) || "",
    finishReason: await result.finishReason,
    usage: await result.usage,
    toolCalls,
    responseId: (await result.response).id,
    modelId: (await result.response).modelId,
    errors,
  }));
}

main().catch((err) => { console.error(err); process.exit(1); });
