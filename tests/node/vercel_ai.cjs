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
