/*
 * The few declarations of Metal that csrc/backend/metal/metal_host.m uses, for a syntax check on Linux
 * (tests/test_metal_host.py): not Apple's header. Each name, type and enum value is as Apple declares it
 * (tests/metal_objc/README.md says where each was checked); Apple's macros are spelled out: NS_ENUM and
 * NS_OPTIONS as enums with a fixed underlying type, API_AVAILABLE(macos(X)) as clang's availability
 * attribute (only macOS: what the cross compile for macOS 14 checks), API_DEPRECATED as deprecated
 * availability, NS_ASSUME_NONNULL_BEGIN as the clang pragma. Add a declaration only for a call
 * metal_host.m makes.
 */
#ifndef FM_TEST_METAL_H
#define FM_TEST_METAL_H

#import <Foundation/Foundation.h>

#pragma clang assume_nonnull begin

/* MTLTypes.h */
typedef struct {
    NSUInteger width, height, depth;
} MTLSize;
static inline MTLSize MTLSizeMake(NSUInteger width, NSUInteger height, NSUInteger depth) {
    MTLSize size = {width, height, depth};
    return size;
}

/* MTLResource.h: MTLResourceStorageModeShared = MTLStorageModeShared (0) << MTLResourceStorageModeShift (4) */
typedef enum MTLResourceOptions : NSUInteger {
    MTLResourceStorageModeShared = 0UL << 4,
} MTLResourceOptions;

/* MTLLibrary.h */
typedef enum MTLLanguageVersion : NSUInteger {
    MTLLanguageVersion3_0 __attribute__((availability(macos, introduced = 13.0))) = (3 << 16),
    MTLLanguageVersion3_1 __attribute__((availability(macos, introduced = 14.0))) = (3 << 16) + 1,
} MTLLanguageVersion;

typedef enum MTLMathMode : NSInteger {
    MTLMathModeSafe = 0,
    MTLMathModeRelaxed = 1,
    MTLMathModeFast = 2,
} MTLMathMode;

typedef enum MTLMathFloatingPointFunctions : NSInteger {
    MTLMathFloatingPointFunctionsFast = 0,
    MTLMathFloatingPointFunctionsPrecise = 1,
} MTLMathFloatingPointFunctions;

@interface MTLCompileOptions : NSObject <NSCopying>
@property (readwrite, nonatomic) BOOL fastMathEnabled
    __attribute__((availability(macos, introduced = 10.11, deprecated = 15.0, message = "Use mathMode instead")));
@property (readwrite, nonatomic) MTLMathMode mathMode __attribute__((availability(macos, introduced = 15.0)));
@property (readwrite, nonatomic) MTLMathFloatingPointFunctions mathFloatingPointFunctions
    __attribute__((availability(macos, introduced = 15.0)));
@property (readwrite, nonatomic) MTLLanguageVersion languageVersion;
@end

@protocol MTLFunction <NSObject>
@end

@protocol MTLLibrary <NSObject>
- (nullable id <MTLFunction>) newFunctionWithName:(NSString *)functionName;
@end

/* MTLComputePipeline.h */
@protocol MTLComputePipelineState <NSObject>
@property (readonly) NSUInteger maxTotalThreadsPerThreadgroup;
@end

/* MTLBuffer.h (MTLResource.h's protocol elided: metal_host.m calls none of it) */
@protocol MTLBuffer <NSObject>
@property (readonly) NSUInteger length;
@end

/* MTLCommandEncoder.h, MTLComputeCommandEncoder.h */
@protocol MTLCommandEncoder <NSObject>
- (void)endEncoding;
@end

typedef enum MTLDispatchType : NSUInteger {
    MTLDispatchTypeSerial,
    MTLDispatchTypeConcurrent,
} MTLDispatchType;

@protocol MTLComputeCommandEncoder <MTLCommandEncoder>
- (void)setComputePipelineState:(id <MTLComputePipelineState>)state;
- (void)setBytes:(const void *)bytes length:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)setBuffer:(nullable id <MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index;
- (void)setThreadgroupMemoryLength:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)dispatchThreadgroups:(MTLSize)threadgroupsPerGrid threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
@end

/* MTLCommandBuffer.h */
typedef enum MTLCommandBufferStatus : NSUInteger {
    MTLCommandBufferStatusNotEnqueued = 0,
    MTLCommandBufferStatusEnqueued = 1,
    MTLCommandBufferStatusCommitted = 2,
    MTLCommandBufferStatusScheduled = 3,
    MTLCommandBufferStatusCompleted = 4,
    MTLCommandBufferStatusError = 5,
} MTLCommandBufferStatus;

@protocol MTLCommandBuffer;
typedef void (^MTLCommandBufferHandler)(id <MTLCommandBuffer>);

@protocol MTLCommandBuffer <NSObject>
- (void)commit;
- (void)addCompletedHandler:(MTLCommandBufferHandler)block;
- (void)waitUntilCompleted;
@property (readonly) MTLCommandBufferStatus status;
@property (nullable, readonly) NSError *error;
- (nullable id <MTLComputeCommandEncoder>)computeCommandEncoderWithDispatchType:(MTLDispatchType)dispatchType;
@end

/* MTLCommandQueue.h */
@protocol MTLCommandQueue <NSObject>
- (nullable id <MTLCommandBuffer>)commandBuffer;
@end

/* MTLDevice.h */
@protocol MTLDevice <NSObject>
@property (nonnull, readonly) NSString *name;
@property (readonly) NSUInteger maxBufferLength;
@property (readonly) uint64_t recommendedMaxWorkingSetSize;
- (nullable id <MTLCommandQueue>)newCommandQueue;
- (nullable id <MTLLibrary>)newLibraryWithSource:(NSString *)source options:(nullable MTLCompileOptions *)options error:(__autoreleasing NSError **)error;
- (nullable id <MTLComputePipelineState>)newComputePipelineStateWithFunction:(id <MTLFunction>)computeFunction error:(__autoreleasing NSError **)error;
- (nullable id <MTLBuffer>)newBufferWithBytesNoCopy:(void *)pointer length:(NSUInteger)length options:(MTLResourceOptions)options deallocator:(void (^ __nullable)(void *pointer, NSUInteger length))deallocator;
@end

extern id <MTLDevice> __nullable MTLCreateSystemDefaultDevice(void) __attribute__((ns_returns_retained));

#pragma clang assume_nonnull end

#endif
